"""A stand-in for `tcpmesh run` used by the lab tests: serves /readyz on the config's admin address.

`fake_agent.py [--exit CODE] run --config FILE` — with --exit it prints a line and exits at once.
It also writes its own view (cgroup, netns inode) to <state_dir>/fake-agent.json for the test.
"""

import http.server
import json
import os
import sys

import yaml

args = sys.argv[1:]
if args[:1] == ["--exit"]:
    print("fake agent: failing on purpose", flush=True)
    sys.exit(int(args[1]))
config = yaml.safe_load(open(args[args.index("--config") + 1]))
with open(os.path.join(config["state_dir"], "fake-agent.json"), "w") as f:
    json.dump({"cgroup": open("/proc/self/cgroup").read(), "netns": os.stat("/proc/self/ns/net").st_ino}, f)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/readyz" else 404)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args):
        pass


print("fake agent: serving", flush=True)
http.server.HTTPServer((config["admin"]["address"], config["admin"]["port"]), Handler).serve_forever()
