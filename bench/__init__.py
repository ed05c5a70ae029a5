"""The tcpmesh benchmark (issue #8): the direct path, tcpmesh, stunnel and HAProxy side by side.

``python -m bench`` (``make bench``) builds a two-node namespace lab, runs the same load through
four paths between a client pod on node1 and a server pod on node2, and writes a JSON results
file, a Markdown section of docs/benchmarks.md and a chart. See bench/README.md.

Modules: ``settings`` (what to run, presets) · ``figures`` (pure: figures, medians, ratios,
targets) · ``report`` (pure: Markdown) · ``chart`` (matplotlib) · ``loadgen`` (the C load
generator, iperf3, sockperf) · ``host`` (cgroup CPU, RSS, sysctls, machine facts) · ``peers``
(stunnel and HAProxy configs) · ``world`` (lab, cgroups, certificates, servers, tunnels; cleanup) ·
``scenarios`` (one measurement of one path) · ``databases`` (PostgreSQL and Redis; one pgbench or
redis-benchmark measurement) · ``dbfigures`` (their figures and targets) · ``profile`` (py-spy) ·
``run`` (CLI, the loop, output).
"""
