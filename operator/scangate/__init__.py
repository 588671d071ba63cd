"""scangate: scan-gated delivery for Kubernetes."""

__version__ = "0.1.0"
