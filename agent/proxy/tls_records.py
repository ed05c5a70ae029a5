"""The pure arithmetic of handing a TLS 1.3 connection to the kernel (kernel TLS, ``proxy.kernel_tls``).

What agent.proxy.kernel_tls needs to switch a tunnel at a record boundary, with nothing of sockets, ssl or
asyncio: the cut of a byte stream into TLS records (``RecordCutter``: how much a read may take so that no byte
after the current record enters user space), the ClientHello random that names a connection in a key log
(``client_random``), the key log's lines (``parse_keylog``: NSS key log format, as OpenSSL writes it), the key
schedule's last step (``hkdf_expand_label``, RFC 8446 §7.1; ``traffic_keys`` §7.3), the kernel's
``tls12_crypto_info_*`` structures (``crypto_info``, include/uapi/linux/tls.h) and how many AES blocks a key
has encrypted (``gcm_blocks``, against RFC 8446 §5.5's limit).

Imports nothing of tcpmesh; only hashlib, hmac and struct of the standard library.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

RECORD_HEADER = 5
MAX_RECORD_BODY = 2 ** 14 + 256  # TLSCiphertext.length's limit (RFC 8446 §5.2)
CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
RANDOM_SIZE = 32
_RANDOM_AT = RECORD_HEADER + 4 + 2  # record header, handshake type + length, legacy_version
TLS_1_3_VERSION = 0x0304
KEYLOG_CLIENT = "CLIENT_TRAFFIC_SECRET_0"
KEYLOG_SERVER = "SERVER_TRAFFIC_SECRET_0"
KEYLOG_LABELS = (KEYLOG_CLIENT, KEYLOG_SERVER)  # the only lines kept: the first application traffic secrets

# AES-GCM's usage limit (RFC 8446 §5.5): 2^24.5 full-size records per key, i.e. about 2^34.5 AES blocks
# (a 2^14-byte record is 2^10 blocks). A kernel TLS tunnel cannot rekey (the kernels of 6.1 and 6.12 refuse a
# second TLS_TX with EBUSY), so it is retired instead: no new stream at RETIRE_BLOCKS, closed at CLOSE_BLOCKS.
RETIRE_BLOCKS = 2 ** 33
CLOSE_BLOCKS = 2 ** 34


class KeyScheduleError(ValueError):
    """What the switch to kernel TLS cannot use: an unknown suite, a missing or malformed secret."""


@dataclass(frozen=True)
class Suite:
    """A TLS 1.3 cipher suite as the kernel takes it."""
    name: str          # OpenSSL's name, as ``SSLObject.cipher()[0]`` gives it
    hash_name: str     # the suite's HKDF hash (hashlib)
    key_size: int
    cipher_type: int   # TLS_CIPHER_* (include/uapi/linux/tls.h)
    salt_size: int     # the static IV's part the kernel calls salt; the rest is its ``iv``


SUITES = {s.name: s for s in (
    Suite("TLS_AES_128_GCM_SHA256", "sha256", 16, 51, 4),
    Suite("TLS_AES_256_GCM_SHA384", "sha384", 32, 52, 4),
    Suite("TLS_CHACHA20_POLY1305_SHA256", "sha256", 32, 54, 0),
)}
IV_SIZE = 12
REC_SEQ_SIZE = 8


def suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise KeyScheduleError(f"cipher suite {name} has no kernel TLS form here (known: "
                               f"{', '.join(sorted(SUITES))})") from None


# -- the record boundary ------------------------------------------------------------------------------

class RecordCutter:
    """Follows a TLS byte stream record by record: ``want()`` is how many bytes the next read may take so that
    it ends at most at the current record's end (its 5-byte header, then its body); ``took(data)`` says what
    was read. So the handshake's last record is the last byte user space reads, and the kernel starts at the
    next record with sequence number 0."""

    __slots__ = ("_header", "_left", "records")

    def __init__(self) -> None:
        self._header = bytearray()
        self._left = 0  # body bytes of the current record still to read
        self.records = 0  # whole records read

    def want(self) -> int:
        return self._left if self._left else RECORD_HEADER - len(self._header)

    def took(self, data: bytes | memoryview) -> None:
        """``data`` was read (never more than ``want()`` at a time is expected; more is followed anyway)."""
        view = memoryview(data)
        while view:
            if self._left:
                step = min(self._left, len(view))
                self._left -= step
                view = view[step:]
                if not self._left:
                    self.records += 1
                continue
            step = min(RECORD_HEADER - len(self._header), len(view))
            self._header += view[:step]
            view = view[step:]
            if len(self._header) == RECORD_HEADER:
                self._left = int.from_bytes(self._header[3:5], "big")
                self._header.clear()
                if not self._left:
                    self.records += 1

    @property
    def at_boundary(self) -> bool:
        """Nothing of a record is half read."""
        return not self._left and not self._header


def client_random(first: bytes | memoryview) -> bytes | None:
    """The ClientHello's random from the first bytes of a TLS connection's client-to-server stream (a record
    header, the handshake header, legacy_version, then the random); None if ``first`` is too short or is not a
    ClientHello in a handshake record."""
    if len(first) < _RANDOM_AT + RANDOM_SIZE or first[0] != CONTENT_HANDSHAKE \
            or first[RECORD_HEADER] != HANDSHAKE_CLIENT_HELLO:
        return None
    return bytes(first[_RANDOM_AT:_RANDOM_AT + RANDOM_SIZE])


# -- the key log --------------------------------------------------------------------------------------

def parse_keylog(text: str) -> dict[bytes, dict[str, bytes]]:
    """NSS key log lines (``LABEL <client random hex> <secret hex>``) → client random → label → secret, keeping
    only ``KEYLOG_LABELS``. Comments, blank lines, other labels and malformed lines are skipped (a line cut by
    a concurrent write must not take a good one with it)."""
    found: dict[bytes, dict[str, bytes]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[0] not in KEYLOG_LABELS:
            continue
        try:
            random, secret = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
        except ValueError:
            continue
        if len(random) != RANDOM_SIZE or len(secret) not in (32, 48):
            continue
        found.setdefault(random, {})[parts[0]] = secret
    return found


# -- the key schedule ---------------------------------------------------------------------------------

def hkdf_expand(prk: bytes, info: bytes, length: int, hash_name: str) -> bytes:
    """HKDF-Expand (RFC 5869 §2.3)."""
    size = hashlib.new(hash_name).digest_size
    if length > 255 * size:
        raise KeyScheduleError(f"HKDF-Expand cannot make {length} bytes with {hash_name}")
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hash_name).digest()
        out += block
        counter += 1
    return out[:length]


def hkdf_expand_label(secret: bytes, label: str, context: bytes, length: int, hash_name: str) -> bytes:
    """HKDF-Expand-Label (RFC 8446 §7.1): HkdfLabel = length (2 bytes), "tls13 " + label, context."""
    full = b"tls13 " + label.encode()
    info = struct.pack("!H", length) + bytes([len(full)]) + full + bytes([len(context)]) + context
    return hkdf_expand(secret, info, length, hash_name)


def traffic_keys(secret: bytes, chosen: Suite) -> tuple[bytes, bytes]:
    """(key, iv) of a traffic secret (RFC 8446 §7.3)."""
    if len(secret) != hashlib.new(chosen.hash_name).digest_size:
        raise KeyScheduleError(f"a {len(secret)}-byte traffic secret does not fit {chosen.name}")
    return (hkdf_expand_label(secret, "key", b"", chosen.key_size, chosen.hash_name),
            hkdf_expand_label(secret, "iv", b"", IV_SIZE, chosen.hash_name))


def crypto_info(chosen: Suite, key: bytes, iv: bytes, sequence: int = 0) -> bytes:
    """The kernel's ``struct tls12_crypto_info_*`` for TLS 1.3: version, cipher type, then the 12-byte IV split
    into ``iv`` (its last 8 bytes; all 12 for ChaCha20) and ``salt`` (its first 4), the key, the record
    sequence number (big-endian)."""
    if len(key) != chosen.key_size or len(iv) != IV_SIZE:
        raise KeyScheduleError(f"{chosen.name} takes a {chosen.key_size}-byte key and a {IV_SIZE}-byte IV")
    salt, explicit = iv[:chosen.salt_size], iv[chosen.salt_size:]
    seq = sequence.to_bytes(REC_SEQ_SIZE, "big")
    if chosen.salt_size:  # AES-GCM: iv[8], key, salt[4], rec_seq[8]
        return struct.pack("=HH", TLS_1_3_VERSION, chosen.cipher_type) + explicit + key + salt + seq
    return struct.pack("=HH", TLS_1_3_VERSION, chosen.cipher_type) + explicit + key + seq  # ChaCha20: iv[12], key, rec_seq


def gcm_blocks(size: int) -> int:
    """An upper bound on the AES blocks one send of ``size`` bytes costs its key: the payload and content-type
    byte, plus the counter and tag blocks of each record (``size`` may span several 2^14-byte records)."""
    return (size >> 4) + 3 * ((size >> 14) + 1)
