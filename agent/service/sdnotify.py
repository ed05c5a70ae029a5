"""systemd's readiness protocol (sd_notify), without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

``Type=notify`` units start their main process with ``NOTIFY_SOCKET`` naming a unix datagram
socket (a path, or ``@name`` for the abstract namespace); the process sends newline-separated
``KEY=VALUE`` assignments (``READY=1``, ``STOPPING=1``, ``STATUS=…``) and systemd marks the unit
started when it reads ``READY=1``. Outside systemd the variable is unset and every call is a no-op.

The agent sends ``READY=1`` from ``app.Agent.run()`` exactly where it turns ready: programs loaded
and attached to the local pods, listeners bound, admin endpoint up (docs/install-systemd.md). While
something keeps it from turning ready (a policy set that cannot be loaded), it sends only ``STATUS=``.

Owns only this protocol. Imports nothing of the agent; touches one socket per message.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger("tcpmesh.sdnotify")
ENV_VAR = "NOTIFY_SOCKET"


def format_message(**fields: str | int) -> bytes:
    """``format_message(READY=1, STATUS="ok")`` → ``b"READY=1\\nSTATUS=ok"`` (pure).

    Values must be single lines: systemd reads one assignment per line.
    """
    lines = []
    for key, value in fields.items():
        text = str(value)
        if "\n" in text or not key.isupper():
            raise ValueError(f"sd_notify field {key}={text!r}: keys are upper case, values one line")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


def socket_address(value: str) -> str | bytes | None:
    """The ``connect``/``sendto`` address for a ``NOTIFY_SOCKET`` value; None when unusable (pure).

    ``/run/systemd/notify`` → the path; ``@name`` → the abstract address ``b"\\0name"``.
    Other forms (``vsock:…``, relative paths) are not supported and give None.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def notify(message: bytes, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` to ``$NOTIFY_SOCKET``. False (and nothing sent) when not run by systemd.

    A failure to send is logged, never raised: systemd then times the start out (TimeoutStartSec)
    and says so in the journal, which is the right outcome for an agent that cannot report.
    """
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    if not value:
        return False
    address = socket_address(value)
    if address is None:
        log.error("%s=%r is not a unix socket path or @abstract name; systemd is not told", ENV_VAR, value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.error("cannot notify systemd through %s (%s): %s", value, ENV_VAR, exc)
        return False
    return True


def ready(status: str = "", environ: Mapping[str, str] | None = None) -> bool:
    """``READY=1`` (and a one-line ``STATUS=`` for `systemctl status`)."""
    fields: dict[str, str | int] = {"READY": 1}
    if status:
        fields["STATUS"] = status.replace("\n", " ")
    return notify(format_message(**fields), environ)


def status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    """Only ``STATUS=``: what `systemctl status` shows, e.g. why the agent is not ready yet."""
    return notify(format_message(STATUS=text.replace("\n", " ")), environ)


def extend_start(seconds: float, text: str, environ: Mapping[str, str] | None = None) -> bool:
    """``EXTEND_TIMEOUT_USEC=`` and ``STATUS=``: still starting on purpose (e.g. waiting for the issuer), so
    TimeoutStartSec must not kill the unit within ``seconds`` from now."""
    return notify(format_message(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000), STATUS=text.replace("\n", " ")),
                  environ)


def stopping(status: str = "", environ: Mapping[str, str] | None = None) -> bool:
    """``STOPPING=1``: the agent has begun an orderly stop (systemd shows 'deactivating')."""
    fields: dict[str, str | int] = {"STOPPING": 1}
    if status:
        fields["STATUS"] = status.replace("\n", " ")
    return notify(format_message(**fields), environ)
