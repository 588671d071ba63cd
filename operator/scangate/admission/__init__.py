"""The admission gate: workloads judged under the ScanPolicies at admission."""
