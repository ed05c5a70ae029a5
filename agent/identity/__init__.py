"""Workload identity: SPIFFE IDs, the CA, X.509-SVIDs and the TLS contexts built from them.

``spiffe`` (IDs), ``peer`` (secure naming) and ``errors`` are pure; ``ca`` owns the CA files and
key; ``svid`` the leaf profile; ``tls`` the ``ssl.SSLContext`` builders and the SNI front;
``store`` the node's local identities as atomically swapped snapshots. See docs/identity.md.
"""
