"""What the agent knows about one connection: its facts (``facts.ConnectionFacts``, frozen: built once
from the capture, sent to the other node as the OPEN's CONNECT body) and the record each node keeps
(``flow.Flow``: the working state the data path fills in and telemetry reports).

Below both ``agent.proxy`` (which writes it) and ``agent.telemetry`` / ``agent.audit`` (which read it),
so neither imports the other for it. Pure: imports only ``agent.registry.model``; must not import
the proxy, telemetry, the CLI, asyncio, sockets or ssl.
"""
