"""The data path: the tunnel protocol (pure codec), TLS and plain endpoints, the relay, and the
outbound/inbound proxies. Only ``endpoints``, ``outbound``, ``inbound`` and ``server`` touch sockets;
``header``, ``flow`` and ``routing`` are pure.
"""
