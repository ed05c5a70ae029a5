"""The Kubernetes registry source (``registry.source: kubernetes``): pods, nodes, Services and
EndpointSlices from the API server.

Four list + watch loops (pods, Services, EndpointSlices in every namespace; nodes) keep a local
copy of the objects, the way client-go's reflector does: list (in pages), then watch from the list's resourceVersion with
bookmarks; a watch that ends is re-opened from the last resourceVersion seen; ``410 Gone`` (as an
HTTP status or an ERROR event) means that version is compacted away, so the loop lists again and
replaces its copy whole; any other failure (refused, reset, a dropped stream, a 5xx) waits with a
jittered exponential backoff and resumes. Each loop runs on its own thread, with the official
``kubernetes`` client (installed by the ``kubernetes`` extra), and reads raw JSON, not models.

From the copies ``build_registry`` (pure) makes one ``Registry``:
- every pod with an IPv4 ``status.podIP`` that is not ``hostNetwork`` and not finished becomes a
  workload: name, namespace, ``spec.serviceAccountName`` (identity ``ns/<ns>/sa/<sa>``), IP, and node
  ``spec.nodeName`` — a resolvable destination whose tunnel address is its node's ``InternalIP``;
- pods of this node (``spec.nodeName == node.name``) get their pod cgroup, found from the pod UID
  under the cgroup mount in either kubelet layout (``find_pod_cgroup``), so they are captured;
- every Service with a ClusterIP and an endpoint that is such a workload becomes a registry Service
  (``services.build_services``: ready endpoints, target ports from the EndpointSlices).

One module per job: ``watch`` (list + watch of one resource, backoff), ``mapping`` (pure: objects →
``Registry``), ``services`` (pure: Services + EndpointSlices → registry Services), ``cgroups`` (a
pod's cgroup from its UID), ``source`` (``KubernetesSource``: the four loops → snapshots for the
agent's WorkloadController, ``replace_base``, all or nothing). This file only says so: import from
the modules. Tests: a local HTTP server speaking the list/watch protocol (tests/integration/test_kubernetes_source.py) — the only stand-in in the suite.
"""
