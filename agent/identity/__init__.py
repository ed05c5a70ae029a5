"""Workload identity: SPIFFE IDs, the CA, X.509-SVIDs and the TLS contexts built from them.

``spiffe`` (IDs), ``peer`` (secure naming) and ``errors`` are pure; ``ca`` owns the CA files and
key; ``svid`` the SVID as the agent holds it, ``issue`` the leaf profile; ``tls`` the
``ssl.SSLContext`` builders and the SNI front; ``store`` the node's local identities as atomically
swapped snapshots. The long-running agent never imports cryptography: ``minting`` has a short-lived
worker process (``minter``) load the CA and mint SVIDs. See docs/identity.md.
"""
