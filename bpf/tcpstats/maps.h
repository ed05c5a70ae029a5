/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tcpstats/maps.h — the maps of the kernel TCP statistics (bpf/tcp_stats.c), each with its writer,
 * reader and bound. Names keep the tcpmesh_ prefix and stay distinct in their first 15 characters
 * (tcpmesh_stats_s, tcpmesh_stats_p, tcpmesh_stats_c).
 *
 * Pinned like the capture's maps (docs/capture.md, "Pinned objects"): the loader passes
 * -DTCPMESH_MAPS_DIR="<bpffs dir>/tcpstats-maps-<hash of tcpstats/*.h and the sizes>", and bcc opens
 * or creates each map there, so a restarted agent keeps its series.
 */
#ifndef TCPMESH_TCPSTATS_MAPS_H
#define TCPMESH_TCPSTATS_MAPS_H

#include "tcpstats/abi.h"

#ifdef TCPMESH_MAPS_DIR
#define TCPMESH_STATS_MAP(type, key, leaf, name, entries) \
	BPF_TABLE_PINNED(type, key, leaf, name, entries, TCPMESH_MAPS_DIR "/" #name)
#else
#define TCPMESH_STATS_MAP(type, key, leaf, name, entries) BPF_TABLE(type, key, leaf, name, entries)
#endif

/*
 * tcpmesh_stats_socks: socket cookie -> struct tcpmesh_stats_sock (series slot, retransmits counted).
 *   writer:   user space, when a flow starts relaying (agent/telemetry/tcpstats.py: one update per
 *             leg; a pooled tunnel's socket is written again by each flow, with the same slot).
 *   reader:   the sockops program, at every RTT / retransmit / state callback (it also advances
 *             retrans_seen: the socket is locked during sockops callbacks, so one writer at a time).
 *   eviction: the sockops program deletes the entry when the socket reaches TCP_CLOSE; LRU beyond
 *             TCPMESH_STATS_SOCKETS; user space deletes entries of slots it frees.
 */
TCPMESH_STATS_MAP("lru_hash", __u64, struct tcpmesh_stats_sock, tcpmesh_stats_socks, TCPMESH_STATS_SOCKETS);

/*
 * tcpmesh_stats_pairs: per-CPU array, slot -> struct tcpmesh_tcp_stats.
 *   writer:   the sockops program (this CPU's copy: no atomics); user space zeroes a slot before
 *             it gives it to a new series.
 *   reader:   user space at scrape time, summed over CPUs.
 *   eviction: none; user space owns the slots (frees those of workloads that left).
 */
TCPMESH_STATS_MAP("percpu_array", __u32, struct tcpmesh_tcp_stats, tcpmesh_stats_pairs, TCPMESH_STATS_SLOTS);

/*
 * tcpmesh_stats_counters: per-CPU array indexed by enum tcpmesh_stats_reason.
 *   writer: the sockops program.  reader: user space at scrape time.  eviction: none.
 */
TCPMESH_STATS_MAP("percpu_array", int, __u64, tcpmesh_stats_counters, TCPMESH_SR_SLOTS);

#endif
