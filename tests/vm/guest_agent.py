"""The guest half of the VM tier's command channel: runs inside every test VM, started by systemd
(tcpmesh-vm-guest.service, baked into the image by tests/vm/images.py).

It owns one virtio-serial port (/dev/virtio-ports/org.tcpmesh.vm.0; the host end is a unix socket
of tests/vm/machine.py) and answers one JSON line per request, in order:

  {"id": 1, "op": "run", "argv": [...], "timeout": 60, "env": {...}, "cwd": "/"}
      -> {"id": 1, "rc": 0, "stdout": "...", "stderr": "...", "seconds": 0.4}
  {"id": 2, "op": "ping"}      -> {"id": 2, "kernel": "6.1.0-...", "uptime": 12.3}
  {"id": 3, "op": "poweroff"}  -> {"id": 3, "rc": 0}, then the machine powers off

A command that outlives its timeout is killed with its process group (rc -9, "timed out" in stderr).
Why a channel of our own and not ssh: no keys, no sshd, no guest network needed (the matrix VMs have
none), and the host decides everything the guest runs. Standard library only (the guest's python3);
imports nothing from tcpmesh.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

PORT = "/dev/virtio-ports/org.tcpmesh.vm.0"


def answer(request: dict) -> dict:
    op = request.get("op")
    if op == "ping":
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return {"kernel": os.uname().release, "uptime": uptime}
    if op == "poweroff":
        subprocess.Popen(["systemctl", "poweroff", "--no-block"], start_new_session=True)
        return {"rc": 0}
    if op == "run":
        return run(request)
    return {"rc": 2, "stdout": "", "stderr": f"guest_agent: unknown op {op!r} (ping, run, poweroff)"}


def run(request: dict) -> dict:
    env = dict(os.environ)
    env.update(request.get("env") or {})
    started = time.monotonic()
    proc = subprocess.Popen(request["argv"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=request.get("cwd") or "/", env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=request.get("timeout") or 600)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = -9
        err += f"\nguest_agent: timed out after {request.get('timeout')} s, process group killed".encode()
    return {"rc": rc, "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace"),
            "seconds": round(time.monotonic() - started, 3)}


def serve(port: str) -> None:
    while not os.path.exists(port):
        time.sleep(0.2)
    fd = os.open(port, os.O_RDWR)
    buffered = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:          # host not connected (yet): the port reads EOF; wait for it
            time.sleep(0.2)
            continue
        buffered += chunk
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            try:
                request = json.loads(line)
                reply = answer(request)
            except Exception as exc:  # a bad request must not end the channel
                request, reply = {}, {"rc": 2, "stdout": "", "stderr": f"guest_agent: {exc!r}"}
            reply["id"] = request.get("id")
            data = (json.dumps(reply) + "\n").encode()
            while data:
                data = data[os.write(fd, data):]


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else PORT)
