/* SPDX-License-Identifier: Apache-2.0 */
/*
 * maps.h — every map of the ebpf-connect capture mode, in one place.
 * Each entry says who writes it, who reads it, and what bounds it. Names carry the tcpmesh_
 * prefix so `bpftool map show` makes a crashed run's leftovers recognisable (the kernel keeps
 * the first 15 characters of a map name).
 */
#ifndef TCPMESH_LIB_MAPS_H
#define TCPMESH_LIB_MAPS_H

#include "tcpmesh_abi.h"

#ifndef TCPMESH_MAX_CONNS
#define TCPMESH_MAX_CONNS 65536
#endif
#ifndef TCPMESH_MAX_CIDRS
#define TCPMESH_MAX_CIDRS 1024
#endif

/*
 * tcpmesh_cookie_origin: socket cookie -> struct tcpmesh_origin.
 *   writer:   cgroup/connect4 and connect6, when they capture a connect().
 *   readers:  sockops (re-key at ACTIVE_ESTABLISHED), cgroup/getpeername4/6 (the original peer).
 *   eviction: LRU. Entries outlive the connection on purpose (getpeername() works until close);
 *             the size bounds how many live captured sockets keep a transparent getpeername().
 */
BPF_TABLE("lru_hash", __u64, struct tcpmesh_origin, tcpmesh_cookie_origin, TCPMESH_MAX_CONNS);

/*
 * tcpmesh_peer_origin: client (local ip, local port) -> struct tcpmesh_origin.
 *   writer:   sockops at ACTIVE_ESTABLISHED (insert/overwrite: a reused client port overwrites);
 *             sockops also deletes the entry when an uncaptured socket with the same local
 *             ip/port connects straight to the redirect address (no stale answer for it).
 *   reader:   cgroup/getsockopt on the proxy's accepted socket (key = the socket's peer).
 *   eviction: LRU; the proxy reads the record right after accept(), so the size only has to
 *             cover connections established but not yet accepted.
 */
BPF_TABLE("lru_hash", struct tcpmesh_peer_key, struct tcpmesh_origin, tcpmesh_peer_origin,
	  TCPMESH_MAX_CONNS);

/*
 * tcpmesh_capture_cidrs: LPM trie, destination prefix -> struct tcpmesh_cidr_value.
 *   writer:   user space only (agent/capture/connect_mode.py, from the config; default 0.0.0.0/0).
 *   reader:   cgroup/connect4 and connect6 (longest prefix decides capture or bypass; no match =
 *             not captured).
 *   eviction: none; user space owns the content (agent/capture/cidrs.py refuses more than fit).
 */
BPF_LPM_TRIE(tcpmesh_capture_cidrs, struct tcpmesh_cidr_key, struct tcpmesh_cidr_value,
	     TCPMESH_MAX_CIDRS);

/*
 * tcpmesh_counters: per-CPU array indexed by enum tcpmesh_reason.
 *   writers:  every hook (tcpmesh_count()).
 *   reader:   user space, summed over CPUs at scrape time (ConnectCapture.counters()).
 *   eviction: none; fixed size TCPMESH_R_MAX.
 */
BPF_PERCPU_ARRAY(tcpmesh_counters, __u64, TCPMESH_R_MAX);

#endif /* TCPMESH_LIB_MAPS_H */
