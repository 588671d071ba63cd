"""ImageScan lifecycle: queue, Trivy Job spec, result collection."""
