"""The access/audit log: one JSON record per connection, hash-chained, written off the data path.

``record`` builds a record from a flow (pure); ``chain`` seals records into chained lines and
verifies them (pure); ``writer`` owns the file or stdout, rotation and the writer thread; ``cli``
is ``tcpmesh audit verify``. Format and guarantees: docs/telemetry.md.
"""
