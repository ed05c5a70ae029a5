"""The return path that lets the inbound proxy connect to a pod from the client pod's own address.

The inbound leg is an IP_TRANSPARENT socket bound to the client pod's address and marked
``abi.SOURCE_MARK`` (agent.proxy.upstream). The pod answers that address, which the node would
forward to the client's own node. Two kernel objects bring the answers back to the proxy instead:

  - bpf/source_return.c on tc ingress of each local pod's node-side veth (clsact, priority
    ``PRIORITY``, one below the ebpf-tc capture filter, name ``tcpmesh_ret_in``, all protocols): a TCP
    packet whose 4-tuple is a socket carrying SOURCE_MARK gets STEER_MARK;
  - the fwmark rules and ``local 0.0.0.0/0`` / ``local ::/0`` tables of agent.capture.steering,
    which deliver marked packets locally (the IPv4 pair is the one the ebpf-tc and iptables modes use).
    IPv4's is required; IPv6's is set up where the kernel allows (``SourceReturn.ipv6``): where it does
    not, IPv6 legs leave from the node's address (``auto``) or the agent refuses to start (``pod``).

``SourceReturn`` is driven like a capture mode, independently of which one runs: ``start()`` has
the loader child compile the program and hand its fd back, then installs the steering objects;
``attach(w)``/``detach(w)`` follow the node's workloads; ``stop()`` removes its filters and the
steering objects (what an orderly stop of the agent does), ``close()`` leaves them: they are inert without the
proxy's marked sockets, the next start replaces them, and `tcpmesh cleanup` finds them (every tc
filter named tcpmesh* and the steering objects, agent.capture.tc_mode.cleanup_leftovers). The netlink calls run in a
short-lived child (agent.capture.source_return_child, the program fd inherited), so the agent never
imports pyroute2 for them. Must not import the proxy, pyroute2 or bcc.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from agent.bpf import sources
from agent.bpf.loader import Loaded, LoadRequest, Program, load
from agent.capture import abi
from agent.bpf.errors import NotLoaded
from agent.capture.interface import Capture
from agent.errors import KernelError, TcpmeshError
from agent.registry.model import Workload

log = logging.getLogger("tcpmesh.capture")

SOURCE_NAME = "source_return.c"
PROGRAM = "tcpmesh_ret_in"             # the C function, and the tc filter's name (agent.capture.source_return_child)
PROG_SCHED_CLS = 3                     # BPF_PROG_TYPE_SCHED_CLS
CHILD_TIMEOUT = 30.0


class SourceReturn:
    """One loaded copy of source_return.c and the pod interfaces it is attached to."""

    def __init__(self, state_dir: str, *, netns: str | None = None, source_dir: str | None = None) -> None:
        self.state_dir = state_dir
        self.netns = netns
        self.source_dir = Path(source_dir) if source_dir else sources.bpf_dir()
        self._loaded: Loaded | None = None
        self._attached: dict[str, tuple[int, str]] = {}  # workload key -> (ifindex, ifname)
        self.ipv6 = "absent"  # after start(): "ok" (IPv6 legs get their replies back), "absent" (no IPv6
        #                       in this kernel: no IPv6 leg can exist), or why the IPv6 pair cannot be set up

    def start(self) -> None:
        if self._loaded is not None:
            return
        loaded = load(LoadRequest(str(self.source_dir / SOURCE_NAME), tuple(sources.base_cflags(self.source_dir)),
                                  str(self.state_dir), (Program(PROGRAM, PROG_SCHED_CLS),)))
        try:
            self.ipv6 = self._netlink({"op": "ensure"})["ipv6"]
        except BaseException:
            loaded.close()
            raise
        self._loaded = loaded

    def attach(self, workload: Workload) -> None:
        """Our filter on ingress of the interface ``workload.ip`` routes through. Idempotent."""
        if self._loaded is None:
            raise NotLoaded("SourceReturn.start() has not run (or stop() already did)")
        fd = self._loaded.programs[PROGRAM]
        index, ifname = self._netlink({"op": "attach", "ip": workload.ip, "fd": fd}, fd)
        link = (int(index), str(ifname))
        previous = self._attached.get(workload.key)
        self._attached[workload.key] = link
        if previous is not None and previous != link:
            self._release(previous)

    def detach(self, workload: Workload) -> None:
        link = self._attached.pop(workload.key, None)
        if link is not None:
            self._release(link)

    def stop(self) -> None:
        """Remove our filters and the steering objects (one child; it tries all, then reports the first failure)."""
        links = sorted(set(self._attached.values()))
        self._attached.clear()
        try:
            self._netlink({"op": "stop", "links": [list(link) for link in links]})
        finally:
            if self._loaded is not None:
                self._loaded.close()
                self._loaded = None

    def close(self) -> None:
        """Release the program fd and forget attachments; the filters (which keep the program) and the
        steering objects stay — what the agent does at exit."""
        self._attached.clear()
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None

    def attachments(self) -> dict[str, str]:
        """{workload key: interface}, for `doctor` and tests."""
        return {key: ifname for key, (_, ifname) in sorted(self._attached.items())}

    def _release(self, link: tuple[int, str]) -> None:
        if link not in self._attached.values():
            self._netlink({"op": "release", "links": [list(link)]})

    def _netlink(self, request: dict, fd: int | None = None):
        """One operation in the child (agent.capture.source_return_child); its error as a KernelError."""
        request = {**request, "netns": self.netns}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (sources.package_root(), env.get("PYTHONPATH", "")) if p)
        try:
            done = subprocess.run([sys.executable, "-m", "agent.capture.source_return_child", json.dumps(request)],
                                  pass_fds=(fd,) if fd is not None else (), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=env)
        except subprocess.TimeoutExpired as exc:
            raise KernelError(f"source return {request['op']}", self.netns or "this netns",
                              detail=f"the netlink child did not finish within {CHILD_TIMEOUT:.0f}s") from exc
        try:
            answer = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            answer = {"ok": False, "error": f"no answer (exit {done.returncode}): {done.stderr.strip()[-500:]}"}
        if not answer["ok"]:
            raise KernelError(f"source return {request['op']}", request.get("ip") or self.netns or "this netns",
                              detail=answer["error"])
        return answer["result"]


class WithSourceReturn:
    """A capture mode plus the return path, attached and detached together: what the agent drives
    (the ``Capture`` interface) when proxy.source_address is pod or auto. ``source_mark`` is the SO_MARK
    IPv4 inbound legs carry and ``source_mark6`` IPv6 ones, or 0 when that family's return path could not
    start (auto: the node's address). ``required``: refuse to start without it (pod); ``required6``:
    also without the IPv6 pair, unless the kernel has no IPv6 at all (pod with capture.ipv6 on)."""

    def __init__(self, capture: Capture, source: SourceReturn, required: bool, required6: bool | None = None) -> None:
        self.capture = capture
        self.source: SourceReturn | None = source
        self.required = required
        self.required6 = required if required6 is None else required6
        self.problem = ""  # why the return path is off (auto only)
        self.problem6 = ""  # why the IPv6 return path is off while IPv4's runs (auto only)
        self.name = capture.name
        self.listener = capture.listener
        self.inbound = capture.inbound
        self.egress = capture.egress
        self.refusals = capture.refusals
        self.origin = capture.origin  # the outbound data path calls the mode's own method, no extra frame
        self.set_mesh_destinations = capture.set_mesh_destinations

    @property
    def source_mark(self) -> int:
        return abi.SOURCE_MARK if self.source is not None else 0

    @property
    def source_mark6(self) -> int:
        return abi.SOURCE_MARK if self.source is not None and self.source.ipv6 == "ok" else 0

    def start(self) -> None:
        self.capture.start()
        try:
            self.source.start()
        except TcpmeshError as exc:
            if self.required:
                raise TcpmeshError(f"proxy.source_address is pod but the return path cannot start: {exc}; "
                                   "set proxy.source_address to node (servers then see the node's address)") from exc
            self.problem = str(exc)
            self.source = None
            log.warning("proxy.source_address auto: servers will see the node's address, not the client pod's: %s",
                        exc)
            return
        if self.source.ipv6 in ("ok", "absent"):
            return
        if self.required6:  # the agent's stop() then removes what started (nothing half-applied)
            problem = self.source.ipv6
            raise TcpmeshError(f"proxy.source_address is pod but the IPv6 return path cannot start: {problem}; "
                               "fix that, or set proxy.source_address to auto (IPv6 servers then see the node's "
                               "address) or capture.ipv6 to false (IPv6 to workloads refused at connect)")
        self.problem6 = self.source.ipv6
        log.warning("proxy.source_address auto: IPv6 servers will see the node's address, not the client pod's "
                    "(IPv4 servers see the pod's): %s", self.problem6)

    def attach(self, workload: Workload) -> None:
        self.capture.attach(workload)
        if self.source is None:
            return
        try:
            self.source.attach(workload)
        except BaseException:
            self.capture.detach(workload)  # all or nothing: the controller reports the workload as not captured
            raise

    def detach(self, workload: Workload) -> None:
        try:
            if self.source is not None:
                self.source.detach(workload)
        finally:
            self.capture.detach(workload)

    def stop(self) -> None:
        """The mode's own stop, then the return path's filters and steering objects are removed (one
        netlink child): an orderly stop leaves nothing of it, whatever the mode keeps for failing closed
        (ebpf-connect's capture stays; ebpf-tc and iptables leave no filter or rule at all). A killed
        agent leaves them, inert without its marked sockets; the next start replaces them and
        `tcpmesh cleanup` removes them."""
        try:
            self.capture.stop()
        finally:
            if self.source is not None:
                self.source.stop()

    def counters(self) -> dict[str, int]:
        return self.capture.counters()
