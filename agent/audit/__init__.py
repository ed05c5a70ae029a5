"""The access/audit log: one JSON record per connection, chained with HMAC-SHA256, written off the data path.

``record`` builds a record from a flow (pure); ``keys`` owns the key file (created 0600, rotated by
adding a key); ``chain`` seals records into MAC-chained lines and verifies them (pure); ``writer``
owns the file or stdout, rotation, the tail check on start and the writer thread; ``cli`` is
``tcpmesh audit verify --key`` and ``tcpmesh audit rotate-key``. Format and guarantees:
docs/telemetry.md. Must not import cryptography (the running agent never maps it).
"""
