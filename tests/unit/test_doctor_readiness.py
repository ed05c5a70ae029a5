"""`tcpmesh doctor --config`'s readiness lines: a policy.dir that does not load is named with file,
line and field; a running agent's /readyz reason is passed through; nothing listening is said so."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from agent.host import readiness

TYPO = "kind: AuthorizationPolicy\nmetadata: {name: typo, namespace: data}\nspec:\n  action: DENNY\n"


def test_a_policy_dir_that_does_not_load_is_named_and_says_what_it_means(tmp_path):
    (tmp_path / "typo.yaml").write_text(TYPO)
    status = readiness.policy_status(str(tmp_path))
    assert status == {"dir": str(tmp_path), "loads": False,
                      "detail": f"{tmp_path}/typo.yaml:4: spec.action: 'DENNY' is not ALLOW, DENY or AUDIT"}
    lines = readiness.render(status, {"url": "u", "reachable": False, "ready": False, "detail": "no agent answers"})
    assert lines[0].startswith("policy.dir DOES NOT LOAD: ") and "NOT READY" in lines[1]
    assert lines[2] == "running agent (u): not running: no agent answers"
    missing = readiness.policy_status(str(tmp_path / "nope"))
    assert not missing["loads"] and "policy.dir: does not exist" in missing["detail"]
    (tmp_path / "typo.yaml").unlink()
    assert readiness.policy_status(str(tmp_path))["loads"]


def test_the_running_agents_readyz_reason_is_reported(tmp_path):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = b"not ready: no policy set is in force: x.yaml:4: spec.action: bad\n"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        agent = readiness.running_agent("127.0.0.1", port)
    finally:
        server.shutdown()
        server.server_close()
    assert agent == {"url": f"http://127.0.0.1:{port}/readyz", "reachable": True, "ready": False,
                     "detail": "not ready: no policy set is in force: x.yaml:4: spec.action: bad"}
    gone = readiness.running_agent("127.0.0.1", port)
    assert not gone["reachable"] and gone["detail"].startswith("no agent answers")
