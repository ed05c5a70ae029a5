"""Where the kubelet put a pod's cgroup: from the pod UID (and QoS class), below the cgroup v2 mount.

Both kubelet layouts (systemd and cgroupfs drivers) first, then a bounded search of ``kubepods*``
directories. ``pod_cgroup_candidates`` is pure; ``find_pod_cgroup`` reads directories only.
``own_pod_cgroup`` is ``python -m agent.registry.kubernetes pod-cgroup|kubepods-cgroup CGROUP_ROOT
POD_UID``, which the DaemonSet runs before the agent (docs/install-kubernetes.md). Imports nothing of
the agent.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

QOS_CLASSES = ("guaranteed", "burstable", "besteffort")


def pod_cgroup_candidates(uid: str, qos_class: str = "") -> list[str]:
    """Where the kubelet puts a pod's cgroup, relative to the cgroup v2 mount, most likely first.

    systemd driver: ``kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid, - → _>.slice``
    (Guaranteed pods sit directly in kubepods.slice); cgroupfs driver: ``kubepods/<qos>/pod<uid>``
    (Guaranteed: ``kubepods/pod<uid>``). The pod's own QoS class comes first, then the others.
    """
    underscored = uid.replace("-", "_")
    qos = (qos_class or "").lower()
    order = [qos] + [q for q in QOS_CLASSES if q != qos] if qos in QOS_CLASSES else list(QOS_CLASSES)
    paths = []
    for q in order:
        if q == "guaranteed":
            paths += [f"kubepods.slice/kubepods-pod{underscored}.slice", f"kubepods/pod{uid}"]
        else:
            paths += [f"kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{underscored}.slice",
                      f"kubepods/{q}/pod{uid}"]
    return paths


def find_pod_cgroup(cgroup_root: str, uid: str, qos_class: str = "", *, search_depth: int = 4,
                    isdir: Callable[[str], bool] = os.path.isdir) -> str | None:
    """The pod cgroup directory of pod ``uid``: the two standard layouts first, then a bounded search
    of ``kubepods*`` directories (kubelets with their own --cgroup-root, kind, nested runtimes)."""
    if not uid:
        return None
    for relative in pod_cgroup_candidates(uid, qos_class):
        path = os.path.join(cgroup_root, relative)
        if isdir(path):
            return path
    names = (f"pod{uid}", f"-pod{uid.replace('-', '_')}.slice")
    return _search(cgroup_root, names, search_depth)


def _search(directory: str, names: tuple[str, ...], depth: int) -> str | None:
    if depth <= 0:
        return None
    try:
        entries = [e for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return None
    for entry in entries:
        if entry.name == names[0] or entry.name.endswith(names[1]):
            return entry.path
    for entry in entries:
        if "kubepods" in entry.name or "kubelet" in entry.name:
            found = _search(entry.path, names, depth - 1)
            if found:
                return found
    return None


def kubepods_of(pod_cgroup: str, cgroup_root: str) -> str | None:
    """The kubelet's top cgroup above ``pod_cgroup`` (the topmost ancestor named ``kubepods`` or
    ``kubepods.slice``: every pod of the node is below it), or None. Pure."""
    relative = os.path.relpath(pod_cgroup, cgroup_root).split(os.sep)
    for i, name in enumerate(relative[:-1]):
        if name in ("kubepods", "kubepods.slice"):
            return os.path.join(cgroup_root, *relative[:i + 1])
    return None


def own_pod_cgroup(argv: list[str]) -> int:
    """``python -m agent.registry.kubernetes pod-cgroup|kubepods-cgroup CGROUP_ROOT POD_UID``: print
    the pod's cgroup, or the kubelet's kubepods cgroup above it.

    The DaemonSet's container runs in a private cgroup namespace, so /proc/self/cgroup says "/";
    it asks this for its own pod's cgroup on the host's mount and passes it as
    TCPMESH_CAPTURE_PROXY_CGROUP (where the getsockopt hook goes), and for the kubepods cgroup above
    it as TCPMESH_CAPTURE_PODS_CGROUP (the node guard's place; docs/install-kubernetes.md).
    """
    if len(argv) != 3 or argv[0] not in ("pod-cgroup", "kubepods-cgroup"):
        print("usage: python -m agent.registry.kubernetes pod-cgroup|kubepods-cgroup CGROUP_ROOT POD_UID",
              file=sys.stderr)
        return 2
    found = find_pod_cgroup(argv[1], argv[2])
    if found is None:
        print(f"no cgroup of pod {argv[2]} below {argv[1]} (kubepods.slice/… or kubepods/…)", file=sys.stderr)
        return 1
    if argv[0] == "kubepods-cgroup":
        found = kubepods_of(found, argv[1])
        if found is None:
            print(f"the cgroup of pod {argv[2]} is below no kubepods or kubepods.slice directory of {argv[1]}",
                  file=sys.stderr)
            return 1
    print(found)
    return 0
