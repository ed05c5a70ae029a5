"""Kernel TLS both ways against user-space TLS relays: a prototype that runs INSIDE a VM tier guest
(Debian 12, kernel 6.1 with the `tls` module). Not product code; README.md beside it says how to run it.

Path of every measurement (all on the guest's loopback, one TCP connection per hop):

    client --plain--> relay A --TLS 1.3 tunnel--> relay B --plain--> server

Relays (one Python process per relay, one connection at a time, blocking sockets, one epoll loop):
  plain  no TLS at all: the cost floor of the Python relay loop itself
  user   TLS in user space with OpenSSL memory BIOs (ssl.SSLObject), as tcpmesh's agent does
  ktls   the handshake in user space (ssl.SSLSocket, no session tickets), then the TLS 1.3 traffic
         secrets from the keylog callback -> HKDF-Expand-Label -> setsockopt(SOL_TLS, TLS_TX and
         TLS_RX): the relay copies plaintext only, the kernel encrypts in send and decrypts in recv
and stunnel (the C peer of the bench) as the reference, and the direct path.

Subcommands: `run` (the whole measurement; prints one JSON document), `relay`, `checkserver`,
`controls` (what a kTLS receive does with an alert and a KeyUpdate record). Standard library plus
`cryptography` (the test venv /opt/tcpmesh-test of the image has it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time

SOL_TLS = 282
TLS_TX, TLS_RX = 1, 2
TCP_ULP = 31
TLS_SET_RECORD_TYPE, TLS_GET_RECORD_TYPE = 1, 2
TLS_1_3_VERSION = 0x0304
# cipher suite -> (hash, key length, kernel cipher type)
SUITES = {"TLS_AES_128_GCM_SHA256": ("sha256", 16, 51), "TLS_AES_256_GCM_SHA384": ("sha384", 32, 52)}
HERE = os.path.dirname(os.path.abspath(__file__))
LOCAL = "127.0.0.1"


# ---- kTLS set-up from the TLS 1.3 traffic secrets ------------------------------------------------------

def hkdf_expand_label(secret: bytes, label: bytes, length: int, hash_name: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    full = b"tls13 " + label
    info = struct.pack("!H", length) + bytes([len(full)]) + full + b"\x00"
    algorithm = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384()}[hash_name]
    return HKDFExpand(algorithm=algorithm, length=length, info=info).derive(secret)


def crypto_info(secret: bytes, suite: str, seq: int = 0) -> bytes:
    """struct tls12_crypto_info_aes_gcm_{128,256}: version, cipher_type, iv[8], key, salt[4], rec_seq[8]."""
    hash_name, key_len, cipher_type = SUITES[suite]
    key = hkdf_expand_label(secret, b"key", key_len, hash_name)
    iv = hkdf_expand_label(secret, b"iv", 12, hash_name)
    return struct.pack("=HH", TLS_1_3_VERSION, cipher_type) + iv[4:] + key + iv[:4] + struct.pack("!Q", seq)


def traffic_secrets(keylog: str) -> tuple[bytes, bytes]:
    """The last connection's CLIENT_/SERVER_TRAFFIC_SECRET_0 (one connection at a time per process)."""
    found: dict[str, bytes] = {}
    with open(keylog) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[0] in ("CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"):
                found[parts[0]] = bytes.fromhex(parts[2])
    return found["CLIENT_TRAFFIC_SECRET_0"], found["SERVER_TRAFFIC_SECRET_0"]


def ktls_handshake(raw: socket.socket, ctx: ssl.SSLContext, server_side: bool, keylog: str) -> socket.socket:
    """Handshake with OpenSSL owning the blocking socket (it reads record by record, so nothing past the
    handshake is buffered in user space), then both directions in the kernel with sequence number 0
    (TLS 1.3 restarts sequence numbers with the application traffic keys; the server sends no
    NewSessionTicket: num_tickets = 0). Returns a plain socket object on the same descriptor."""
    wrapped = ctx.wrap_socket(raw, server_side=server_side)
    suite = wrapped.cipher()[0]
    client_secret, server_secret = traffic_secrets(keylog)
    tx, rx = (server_secret, client_secret) if server_side else (client_secret, server_secret)
    fd = wrapped.detach()
    sock = socket.socket(fileno=fd)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    sock.setsockopt(SOL_TLS, TLS_TX, crypto_info(tx, suite))
    sock.setsockopt(SOL_TLS, TLS_RX, crypto_info(rx, suite))
    return sock


def send_alert(sock: socket.socket, payload: bytes = b"\x01\x00", record_type: int = 21) -> None:
    """A non-data record on a kTLS TX socket (default: close_notify alert)."""
    sock.sendmsg([payload], [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes([record_type]))])


def recv_control(sock: socket.socket) -> tuple[int, bytes]:
    """After recv() failed with EIO: the pending non-data record, read with its type."""
    data, ancillary, _, _ = sock.recvmsg(16384, socket.CMSG_SPACE(1))
    record_type = next((c[2][0] for c in ancillary if c[0] == SOL_TLS and c[1] == TLS_GET_RECORD_TYPE), 23)
    return record_type, data


# ---- the relay -------------------------------------------------------------------------------------------

def contexts(cert: str, key: str, keylog: str | None) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(cert, key)
    server.num_tickets = 0
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    if keylog:
        server.keylog_filename = keylog
        client.keylog_filename = keylog
    return server, client


def bio_handshake(raw: socket.socket, ctx: ssl.SSLContext, server_side: bool):
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=server_side)
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                raw.sendall(outgoing.read())
            data = raw.recv(65536)
            if not data:
                raise ConnectionError("tunnel closed during the handshake")
            incoming.write(data)
    if outgoing.pending:
        raw.sendall(outgoing.read())
    return obj, incoming, outgoing


class Tunnel:
    """The TLS side of a relay: write(plaintext), read() -> list of plaintext (b'' = end), close_write()."""

    def __init__(self, raw: socket.socket, mode: str, ctx: ssl.SSLContext, server_side: bool, keylog: str | None):
        self.mode = mode
        self.controls: list[int] = []
        self.early: list[bytes] = []      # records that came in the handshake's last read
        if mode == "user":
            self.obj, self.incoming, self.outgoing = bio_handshake(raw, ctx, server_side)
            self.early = self._decrypt()
        elif mode == "ktls":
            raw = ktls_handshake(raw, ctx, server_side, keylog)
        self.sock = raw

    def write(self, data: bytes) -> None:
        if self.mode == "user":
            self.obj.write(data)
            self.sock.sendall(self.outgoing.read())
        else:
            self.sock.sendall(data)

    def read(self) -> list[bytes]:
        if self.mode == "ktls":
            try:
                data = self.sock.recv(65536)
            except OSError as exc:
                if exc.errno != 5:        # EIO: a non-data record is next
                    raise
                record_type, payload = recv_control(self.sock)
                self.controls.append(record_type)
                if record_type == 21 and payload[:2] in (b"\x01\x00", b"\x02\x00"):   # close_notify
                    return [b""]
                raise ConnectionError(f"kTLS: unexpected record type {record_type} {payload[:8].hex()}")
            return [data]
        data = self.sock.recv(65536)
        if self.mode == "plain" or not data:
            return [data]
        self.incoming.write(data)
        return self._decrypt()

    def _decrypt(self) -> list[bytes]:
        out = []
        while True:
            try:
                chunk = self.obj.read(65536)
            except ssl.SSLWantReadError:
                return out
            except ssl.SSLZeroReturnError:      # close_notify
                chunk = b""
            out.append(chunk)
            if not chunk:                       # close_notify (Python's read answers b"" once it came)
                return out

    def close_write(self) -> None:
        if self.mode == "user":
            try:
                self.obj.unwrap()
            except ssl.SSLWantReadError:
                pass
            self.sock.sendall(self.outgoing.read())
        elif self.mode == "ktls":
            send_alert(self.sock)
        self.sock.shutdown(socket.SHUT_WR)


def relay_connection(plain: socket.socket, tunnel: Tunnel) -> None:
    """Both directions until both have ended (half-close carried: end of one side -> close_notify and
    FIN on the other)."""
    poll = select.epoll()
    tfd, pfd = tunnel.sock.fileno(), plain.fileno()
    poll.register(pfd, select.EPOLLIN)
    poll.register(tfd, select.EPOLLIN)
    open_fds = {pfd, tfd}
    for data in tunnel.early:
        plain.sendall(data)
    try:
        while open_fds:
            for fd, _ in poll.poll():
                if fd == pfd:
                    data = plain.recv(65536)
                    if data:
                        tunnel.write(data)
                    else:
                        tunnel.close_write()
                        poll.unregister(pfd)
                        open_fds.discard(pfd)
                elif fd == tfd:
                    for data in tunnel.read():
                        if data:
                            plain.sendall(data)
                        else:
                            plain.shutdown(socket.SHUT_WR)
                            poll.unregister(tfd)
                            open_fds.discard(tfd)
                            break
    finally:
        poll.close()


def relay(args) -> None:
    """Relay A (--side a): accept plain, dial the tunnel as TLS client. Relay B: accept the tunnel as TLS
    server, dial the targets (first connection to the first, later ones to the last)."""
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)       # kill -USR1 PID: where a stuck relay is
    keylog = None
    if args.mode == "ktls":
        keylog = tempfile.mktemp(prefix=f"keylog-{args.side}-", dir="/tmp")
    server_ctx, client_ctx = contexts(args.cert, args.key, keylog)
    listener = socket.create_server((LOCAL, args.listen), backlog=16)
    targets = [int(p) for p in args.connect.split(",")]
    print(json.dumps({"listening": args.listen, "pid": os.getpid()}), flush=True)
    served = 0
    while True:
        accepted, _ = listener.accept()
        target = targets[min(served, len(targets) - 1)]
        served += 1
        dialled = socket.create_connection((LOCAL, target))
        for s in (accepted, dialled):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if args.side == "a":
            plain, tunnel = accepted, Tunnel(dialled, args.mode, client_ctx, False, keylog)
        else:
            tunnel, plain = Tunnel(accepted, args.mode, server_ctx, True, keylog), dialled
        try:
            relay_connection(plain, tunnel)
        except Exception as exc:  # one bad connection must not end the relay; the check sees it
            print(f"relay {args.side}: {exc!r}", file=sys.stderr, flush=True)
        if tunnel.controls:
            print(f"relay {args.side}: control records {tunnel.controls}", file=sys.stderr, flush=True)
        plain.close()
        tunnel.sock.close()


def checkserver(args) -> None:
    """Reads to the end, then answers sha256 and length of what it read, then closes: a half-close
    test and a bulk sink."""
    listener = socket.create_server((LOCAL, args.listen), backlog=16)
    print(json.dumps({"listening": args.listen, "pid": os.getpid()}), flush=True)
    while True:
        conn, _ = listener.accept()
        digest, total = hashlib.sha256(), 0
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            digest.update(data)
            total += len(data)
        conn.sendall(json.dumps({"sha256": digest.hexdigest(), "bytes": total}).encode())
        conn.close()


# ---- the control-record check -----------------------------------------------------------------------------

def ktls_pair(cert: str, key: str) -> tuple[socket.socket, socket.socket, str]:
    """A connected loopback pair, TLS 1.3 handshaken in user space, then kTLS both ways on both ends."""
    keylog = tempfile.mktemp(prefix="keylog-pair-", dir="/tmp")
    server_ctx, client_ctx = contexts(cert, key, keylog)
    listener = socket.create_server((LOCAL, 0))
    holder: dict = {}

    def serve():
        raw, _ = listener.accept()
        holder["server"] = ktls_handshake(raw, server_ctx, True, keylog)

    thread = threading.Thread(target=serve)
    thread.start()
    wrapped = client_ctx.wrap_socket(socket.create_connection((LOCAL, listener.getsockname()[1])), server_side=False)
    thread.join()           # the server's keylog lines are written: the secrets of this connection
    suite = wrapped.cipher()[0]
    client_secret, server_secret = traffic_secrets(keylog)
    client = socket.socket(fileno=wrapped.detach())
    client.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    client.setsockopt(SOL_TLS, TLS_TX, crypto_info(client_secret, suite))
    client.setsockopt(SOL_TLS, TLS_RX, crypto_info(server_secret, suite))
    listener.close()
    return client, holder["server"], suite


def controls(args) -> dict:
    """Two kTLS ends in one process: data, then a KeyUpdate handshake record and a close_notify alert
    sent as non-data records; what does the receiving end's recv() do?"""
    result: dict = {}
    client, server, suite = ktls_pair(args.cert, args.key)
    result["suite"] = suite
    client.sendall(b"hello")
    result["data"] = server.recv(100).decode()
    server.sendall(b"back")
    result["data_back"] = client.recv(100).decode()

    def probe(name: str, payload: bytes, record_type: int) -> None:
        send_alert(client, payload, record_type)
        try:
            got = server.recv(100)
            result[name] = {"recv": f"returned {got!r}"}
        except OSError as exc:
            entry = {"recv": f"{type(exc).__name__} errno {exc.errno} ({os.strerror(exc.errno)})"}
            record, data = recv_control(server)
            entry["recvmsg"] = f"record type {record}, {data.hex()}"
            result[name] = entry

    probe("keyupdate", b"\x18\x00\x00\x01\x00", 22)   # KeyUpdate(update_not_requested) as a handshake record
    client.sendall(b"after")                          # still under the old key: the sender did not rekey
    result["data_after_keyupdate"] = server.recv(100).decode()
    probe("close_notify", b"\x01\x00", 21)
    client.shutdown(socket.SHUT_WR)
    result["eof_after_close_notify"] = repr(server.recv(100))
    getsock = client.getsockopt(SOL_TLS, TLS_TX, 56)
    result["getsockopt_tls_tx_len"] = len(getsock)
    try:        # a rekey would install the next key on the same socket: does this kernel take it?
        client.setsockopt(SOL_TLS, TLS_TX, crypto_info(os.urandom(48), suite, 0))
        result["tx_rekey_setsockopt"] = "accepted"
    except OSError as exc:
        result["tx_rekey_setsockopt"] = f"errno {exc.errno} ({os.strerror(exc.errno)})"
    client.close()
    server.close()
    return result


def loop_us(step, seconds: float) -> float:
    """Microseconds per call of ``step``, single thread, for about ``seconds``."""
    count, started = 0, time.perf_counter()
    while True:
        for _ in range(100):
            step()
        count += 100
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return round(elapsed / count * 1e6, 2)


def micro(cert: str, key: str, with_ktls: bool, seconds: float = 2.0) -> dict:
    """Per-record costs without wake-ups (one thread, both ends): a 1-byte send + recv over a plain
    loopback pair, over a kTLS pair (the kernel encrypts and decrypts one record), and one user-space
    TLS record (SSLObject write, BIO read, peer BIO write, SSLObject read; no socket)."""
    out: dict = {}
    listener = socket.create_server((LOCAL, 0))
    a = socket.create_connection((LOCAL, listener.getsockname()[1]))
    b, _ = listener.accept()
    listener.close()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def plain_step():
        a.send(b"x")
        b.recv(16)
    out["plain_send_recv_us"] = loop_us(plain_step, seconds)
    server_ctx, client_ctx = contexts(cert, key, None)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    srv = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (c, srv):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        if c_out.pending:
            s_in.write(c_out.read())
        if s_out.pending:
            c_in.write(s_out.read())

    def openssl_step():
        c.write(b"x")
        s_in.write(c_out.read())
        srv.read(16)
    out["openssl_record_us"] = loop_us(openssl_step, seconds)
    if with_ktls:
        k1, k2, _ = ktls_pair(cert, key)

        def ktls_step():
            k1.send(b"x")
            k2.recv(16)
        out["ktls_send_recv_us"] = loop_us(ktls_step, seconds)
    return out


# ---- the measurement -------------------------------------------------------------------------------------

def sh(cmd: str, check: bool = True, timeout: float = 300) -> str:
    done = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{cmd}` exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def start(argv: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{argv} did not start")
    return proc


def check_path(port: int, size: int) -> dict:
    """Send `size` random bytes, half-close, read the server's digest until the end: bytes and
    half-close carried both ways (the answer travels after the client's FIN)."""
    blob = os.urandom(size)
    started = time.monotonic()
    answer = b""
    try:
        with socket.create_connection((LOCAL, port), timeout=30) as s:
            s.sendall(blob)
            s.shutdown(socket.SHUT_WR)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
    except OSError as exc:
        return {"ok": False, "error": repr(exc), "answer": answer[:200].decode(errors="replace")}
    seconds = time.monotonic() - started
    try:
        got = json.loads(answer)
    except ValueError:
        return {"ok": False, "answer": answer[:200].decode(errors="replace"), "seconds": seconds}
    ok = got["sha256"] == hashlib.sha256(blob).hexdigest() and got["bytes"] == size
    return {"ok": ok, "bytes": size, "seconds": round(seconds, 3), "mbit_s": round(size * 8 / seconds / 1e6, 1)}


def stunnel_config(path: str, client: bool, accept: int, connect: list[int], cert: str, key: str) -> None:
    # two services: the first connection (the check) to connect[0], the rest to connect[-1]; stunnel
    # picks a service by its accept port, so the client side has two accept ports too
    # as bench/peers.py runs it (less the certificate verification: none on either side here)
    lines = ["foreground = yes", "pid =", "syslog = no", "debug = warning", f"output = {path}.log",
             "socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1", "sslVersionMin = TLSv1.3",
             "sslVersionMax = TLSv1.3"]
    if client:
        lines += ["[check]", "client = yes", f"accept = {LOCAL}:{accept}", f"connect = {LOCAL}:{connect[0]}",
                  "[rr]", "client = yes", f"accept = {LOCAL}:{accept + 1}", f"connect = {LOCAL}:{connect[1]}"]
    else:
        lines += [f"cert = {cert}", f"key = {key}",
                  "[check]", f"accept = {LOCAL}:{accept}", f"connect = {LOCAL}:{connect[0]}",
                  "[rr]", f"accept = {LOCAL}:{accept + 1}", f"connect = {LOCAL}:{connect[1]}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def run(args) -> None:
    out: dict = {"kernel": os.uname().release, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "ktls" in args.modes:
        sh("modprobe tls")
    work = tempfile.mkdtemp(prefix="ktls-bench-")
    cert, key = f"{work}/cert.pem", f"{work}/key.pem"
    sh(f"openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=relay-b "
       f"-days 2 -keyout {key} -out {cert}")
    args.cert, args.key = cert, key
    loadgen = f"{work}/loadgen"
    sh(f"gcc -O2 -o {loadgen} {args.loadgen_src}")
    out["cpu_flags_aes"] = "aes" in open("/proc/cpuinfo").read().split()
    out["gcm_aes_driver"] = sh("awk '/^name/{n=$3} /^driver/{d=$3} /^priority/{if (n==\"gcm(aes)\") print d, $3}' "
                               "/proc/crypto", check=False).split("\n")[:3]
    out["openssl"] = ssl.OPENSSL_VERSION
    if "ktls" in args.modes:
        out["controls"] = controls(args)
    out["micro"] = micro(cert, key, "ktls" in args.modes)

    stunnel = None
    if args.stunnel_debs and os.path.isdir(args.stunnel_debs):
        root = f"{work}/stunnel-root"
        sh(f"for d in {args.stunnel_debs}/*.deb; do dpkg-deb -x $d {root}; done")
        stunnel = f"env LD_LIBRARY_PATH={root}/lib/x86_64-linux-gnu:{root}/usr/lib/x86_64-linux-gnu {root}/usr/bin/stunnel4"
        out["stunnel"] = sh(f"{stunnel} -version 2>&1 | grep -m1 '^stunnel'", check=False).strip()

    procs: list[subprocess.Popen] = []
    echo = subprocess.Popen([loadgen, "serve", "7001"], stdout=subprocess.PIPE, text=True)
    echo.stdout.readline()
    procs.append(echo)
    procs.append(start([sys.executable, __file__, "checkserver", "--listen", "7002"]))
    paths: dict[str, dict] = {"direct": {"check": 7002, "rr": 7001, "pids": []}}
    base = 7100
    for mode in args.modes.split(","):
        b = start([sys.executable, __file__, "relay", "--side", "b", "--mode", mode, "--listen", str(base + 1),
                   "--connect", "7002,7001", "--cert", cert, "--key", key])
        a = start([sys.executable, __file__, "relay", "--side", "a", "--mode", mode, "--listen", str(base),
                   "--connect", str(base + 1), "--cert", cert, "--key", key])
        procs += [a, b]
        paths[mode] = {"check": base, "rr": base, "pids": [a.pid, b.pid]}
        base += 10
    if stunnel:
        configs = []
        for side, client, accept, connect in (("b", False, base + 2, [7002, 7001]), ("a", True, base, [base + 2, base + 3])):
            conf = f"{work}/stunnel-{side}.conf"
            stunnel_config(conf, client, accept, connect, cert, key)
            configs.append(subprocess.Popen(f"exec {stunnel} {conf}", shell=True))
        procs += configs
        time.sleep(3)
        paths["stunnel"] = {"check": base, "rr": base + 1, "pids": [p.pid for p in configs]}

    try:
        out["checks"] = {}
        for name, p in paths.items():       # each relay's first connection: bytes, half-close, bulk
            print(f"check {name}", file=sys.stderr, flush=True)
            before = [cpu_ticks(pid) for pid in p["pids"]]
            check = check_path(p["check"], args.check_bytes)
            after = [cpu_ticks(pid) for pid in p["pids"]]
            check["relay_cpu_s_per_gb"] = round((sum(after) - sum(before)) / os.sysconf("SC_CLK_TCK")
                                                / (args.check_bytes / 1e9), 2)
            out["checks"][name] = check
        results: dict[str, list] = {name: [] for name in paths}
        for round_no in range(args.rounds):
            for layout in args.layouts.split(","):
                for name, p in paths.items():
                    cpus = "0" if layout == "1cpu" else "0,1"
                    for pid in p["pids"] + [echo.pid]:
                        sh(f"taskset -a -c -p {cpus} {pid}", check=False)
                    print(f"rr {name} {layout} round {round_no}", file=sys.stderr, flush=True)
                    before = [cpu_ticks(pid) for pid in p["pids"]]
                    rr = json.loads(sh(f"taskset -c {cpus} {loadgen} rr {LOCAL} {p['rr']} {args.seconds} 1",
                                       timeout=args.seconds + 60))
                    after = [cpu_ticks(pid) for pid in p["pids"]]
                    count = rr["rtt_us"]["count"]
                    hz = os.sysconf("SC_CLK_TCK")
                    cpu_us = (sum(after) - sum(before)) / hz * 1e6 / count if p["pids"] else 0.0
                    results[name].append({"round": round_no, "layout": layout, "p50": rr["rtt_us"]["p50"],
                                          "p99": rr["rtt_us"]["p99"], "mean": rr["rtt_us"]["mean"], "count": count,
                                          "relay_cpu_us_per_rt": round(cpu_us, 1)})
        out["rr"] = results
    finally:
        for proc in procs:
            proc.kill()
        out["load"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(out, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay")
    r.add_argument("--side", choices=("a", "b"), required=True)
    r.add_argument("--mode", choices=("plain", "user", "ktls"), required=True)
    r.add_argument("--listen", type=int, required=True)
    r.add_argument("--connect", required=True)
    r.add_argument("--cert")
    r.add_argument("--key")
    c = sub.add_parser("checkserver")
    c.add_argument("--listen", type=int, required=True)
    k = sub.add_parser("controls")
    k.add_argument("--cert", required=True)
    k.add_argument("--key", required=True)
    u = sub.add_parser("micro")
    u.add_argument("--cert", required=True)
    u.add_argument("--key", required=True)
    u.add_argument("--ktls", action="store_true")
    m = sub.add_parser("run")
    m.add_argument("--modes", default="plain,user,ktls")
    m.add_argument("--seconds", type=float, default=4)
    m.add_argument("--rounds", type=int, default=3)
    m.add_argument("--layouts", default="1cpu", help="1cpu (every process on CPU 0) and/or unpinned")
    m.add_argument("--check-bytes", type=int, default=16 << 20)
    m.add_argument("--loadgen-src", default=os.path.join(HERE, "loadgen.c"))
    m.add_argument("--stunnel-debs", default=os.path.join(HERE, "debs"))
    args = parser.parse_args()
    if args.cmd == "relay":
        relay(args)
    elif args.cmd == "checkserver":
        checkserver(args)
    elif args.cmd == "micro":
        print(json.dumps(micro(args.cert, args.key, args.ktls), indent=1))
    elif args.cmd == "controls":
        print(json.dumps(controls(args), indent=1))
    else:
        run(args)


if __name__ == "__main__":
    main()
