"""``python -m agent.registry.kubernetes pod-cgroup|kubepods-cgroup CGROUP_ROOT POD_UID`` (the
DaemonSet's start line)."""

import sys

from agent.registry.kubernetes.cgroups import own_pod_cgroup

sys.exit(own_pod_cgroup(sys.argv[1:]))
