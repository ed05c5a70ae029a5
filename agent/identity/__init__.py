"""Workload identity: SPIFFE IDs, the CA, X.509-SVIDs and the TLS contexts built from them."""
