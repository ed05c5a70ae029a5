"""Workload identity: SPIFFE IDs, the CA, X.509-SVIDs and the TLS contexts built from them.

``spiffe`` (IDs), ``peer`` (secure naming) and ``errors`` are pure; ``ca`` owns the CA files and
key; ``svid`` the SVID as the agent holds it, ``issue`` the leaf profile; ``tls`` the
``ssl.SSLContext`` builders and the SNI front; ``store`` the node's local identities as atomically
swapped snapshots; ``schedule`` when to renew, ``svid_rotator`` the agent's task that does it;
``root_rotation`` the operator's three steps of a root CA rotation. The long-running agent never
imports cryptography: ``minting_client`` has a short-lived worker process (``minting_worker``) load
the CA and mint SVIDs. Nothing here imports ``agent.config`` or anything above it. See docs/identity.md.
"""
