"""PolicyReports of what runs (scangate.policyreports.writer)."""
