"""The demo's join hand-off between Vagrant VMs (vagrant/provision.sh, step identity).

In production an operator makes a one-time bootstrap token per node (`tcpmesh issuer token NODE`) and
puts it on that node with the trust bundle (docs/identity.md "Node credentials"). The demo VMs have no
operator machine and no shared folder that works both ways with every provider (Debian's boxes sync
/vagrant one way), so node1 — the demo's admin machine and issuer host — hands every other node its
join material once:

    join_handoff.py serve --dir NODES_DIR --bind ADDR --port P --token T node2 [node3 …]
    join_handoff.py fetch --url http://ADDR:P --token T --node node2 --out DIR

``serve`` answers ``GET /<token>/<node>.tar`` once per listed node (a tar of NODES_DIR/<node>:
join-token, bundle.pem) and exits when all were fetched or after --timeout. ``fetch`` retries until
node1 is up, checks the archive holds exactly those two files, and installs them with join-token 0600.
No key of any kind passes here: the token is good for one join of that one node before it expires,
and the bundle is public. The hand-off token comes from the Vagrantfile (random per checkout). Plain
HTTP on the VMs' private network: acceptable for a disposable demo, never for real nodes.
"""

from __future__ import annotations

import argparse
import hmac
import io
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

FILES = {"join-token": 0o600, "bundle.pem": 0o644}


def archive(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in FILES:
            tar.add(directory / name, arcname=name)
    return buffer.getvalue()


def serve(args: argparse.Namespace) -> int:
    pending = set(args.nodes)
    token = args.token

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *values) -> None:
            print(f"join_handoff: {self.address_string()} {fmt % values}", flush=True)

        def do_GET(self) -> None:  # noqa: N802 — http.server's name
            parts = self.path.strip("/").split("/")
            node = parts[1].removesuffix(".tar") if len(parts) == 2 else ""
            if len(parts) != 2 or not hmac.compare_digest(parts[0], token) or node not in pending:
                self.send_error(404)
                return
            body = archive(Path(args.dir) / node)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            pending.discard(node)

    server = HTTPServer((args.bind, args.port), Handler)
    server.timeout = 1.0
    deadline = time.monotonic() + args.timeout
    while pending and time.monotonic() < deadline:
        server.handle_request()
    server.server_close()
    print(f"join_handoff: done; not fetched: {sorted(pending) or 'none'}", flush=True)
    return 0 if not pending else 1


def fetch(args: argparse.Namespace) -> int:
    url = f"{args.url.rstrip('/')}/{args.token}/{args.node}.tar"
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            data = urllib.request.urlopen(url, timeout=10).read()
            break
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() > deadline:
                print(f"join_handoff: cannot fetch {args.node}'s join material from {args.url}: {exc}", file=sys.stderr)
                return 1
            time.sleep(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        if set(members) != set(FILES) or not all(m.isfile() for m in members.values()):
            print(f"join_handoff: unexpected archive content {sorted(members)}", file=sys.stderr)
            return 1
        for name, mode in FILES.items():
            content = tar.extractfile(members[name]).read()
            tmp = out / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            os.chmod(tmp, mode)
            os.replace(tmp, out / name)
    print(f"join_handoff: {args.node}'s join token and trust bundle installed in {out}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--dir", required=True)
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, default=8479)
    s.add_argument("--token", required=True)
    s.add_argument("--timeout", type=float, default=1800)
    s.add_argument("nodes", nargs="+")
    f = sub.add_parser("fetch")
    f.add_argument("--url", required=True)
    f.add_argument("--token", required=True)
    f.add_argument("--node", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    return serve(args) if args.command == "serve" else fetch(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
