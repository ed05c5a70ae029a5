"""Host: what the agent needs from the node it runs on, and tidying up after it.

  - ``checks``: quick host facts read from /proc and /sys (root, cgroup v2 mount, own cgroup) with
    a reason an operator can act on; imports nothing of agent/ but agent.errors;
  - ``probes``: the kernel and host probes (throwaway namespaces, programs loaded, never attached);
  - ``doctor``: `tcpmesh doctor` — which capture mode this host supports, and why;
  - ``cleanup``: `tcpmesh cleanup` — remove every program, pin and rule tcpmesh left on the node.

Sits above agent.bpf and agent.capture (it probes and cleans what they make); they must not import it.
"""
