/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tcp_stats.c — kernel TCP health of the proxy's own connections, per series (docs/telemetry.md).
 *
 *   sockops (the agent's cgroup)   ESTABLISHED: turn on the RTT, retransmit and state callbacks
 *                                  RTT_CB:      add the smoothed RTT to the socket's series
 *                                  RETRANS_CB:  (and every other callback) add the socket's new
 *                                               retransmissions (total_retrans delta) to its series
 *                                  STATE_CB:    at TCP_CLOSE, count the last ones, forget the socket
 *
 * The proxy owns both ends that matter: on the source node the accepted application socket (the
 * application's leg, over the pod's veth) and the tunnel socket to the destination node; on the
 * destination node the tunnel socket and the socket to the pod. User space registers each of
 * them (cookie -> slot) when a flow starts relaying; the slot stands for (reporter, leg, identity
 * pair). Sockets it never registered (admin HTTP, ...) are only counted as untracked.
 *
 * Fail-open: statistics only. The program never changes a connection and always returns 1.
 * Build: agent/telemetry/tcpstats.py asks the capture's loader process (agent/bpf/loader.py)
 * to compile this file with bcc and pin the program and maps; the agent never imports bcc.
 * Map operations stay in this file (bcc rewrites them only in the main source file).
 */
#include <uapi/linux/bpf.h>
#include "tcpstats/abi.h"
#include "tcpstats/maps.h"
#include "tcpstats/rtt.h"

#define TCPMESH_STATS_CALLBACKS \
	(BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_RETRANS_CB_FLAG | BPF_SOCK_OPS_STATE_CB_FLAG)

static __always_inline void tcpmesh_stats_count(int reason)
{
	__u64 *value = tcpmesh_stats_counters.lookup(&reason);

	if (value)
		*value += 1; /* this CPU's slot */
}

/* This CPU's statistics of the socket's series, or NULL when user space did not register it.
 * The socket's retransmissions since the last callback are added on the way. */
static __always_inline struct tcpmesh_tcp_stats *tcpmesh_stats_of(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct tcpmesh_stats_sock *sock = tcpmesh_stats_socks.lookup(&cookie);
	struct tcpmesh_tcp_stats *stats;
	__u32 index, total;

	if (!sock) {
		tcpmesh_stats_count(TCPMESH_SR_UNTRACKED);
		return 0;
	}
	index = sock->slot;
	stats = tcpmesh_stats_pairs.lookup(&index);
	if (!stats) {
		tcpmesh_stats_count(TCPMESH_SR_BAD_SLOT);
		return 0;
	}
	total = skops->total_retrans;
	if (total > sock->retrans_seen) {
		stats->retransmits += total - sock->retrans_seen;
		sock->retrans_seen = total;
	}
	return stats;
}

static __always_inline void tcpmesh_record_rtt(struct bpf_sock_ops *skops)
{
	struct tcpmesh_tcp_stats *stats = tcpmesh_stats_of(skops);
	__u32 rtt_us = skops->srtt_us >> 3; /* the kernel keeps srtt << 3 */
	__u32 bucket;

	if (!stats)
		return;
	bucket = tcpmesh_rtt_bucket(rtt_us);
	stats->rtt_samples += 1;
	stats->rtt_sum_us += rtt_us;
	if (bucket < TCPMESH_RTT_BUCKETS) /* always true; keeps the verifier's bounds obvious */
		stats->rtt_buckets[bucket] += 1;
}

/* At TCP_CLOSE: count the last retransmissions, then forget the socket. */
static __always_inline void tcpmesh_forget(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);

	tcpmesh_stats_of(skops);
	if (tcpmesh_stats_socks.delete(&cookie) == 0)
		tcpmesh_stats_count(TCPMESH_SR_FORGOTTEN);
}

/* Fail-open (statistics only): always returns 1, never changes the connection. */
int tcpmesh_tstats(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | TCPMESH_STATS_CALLBACKS);
		tcpmesh_stats_count(TCPMESH_SR_ENABLED);
		break;
	case BPF_SOCK_OPS_RTT_CB:
		tcpmesh_record_rtt(skops);
		break;
	case BPF_SOCK_OPS_RETRANS_CB:
		tcpmesh_stats_of(skops); /* counts the new total_retrans */
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			tcpmesh_forget(skops);
		break;
	}
	return 1;
}
