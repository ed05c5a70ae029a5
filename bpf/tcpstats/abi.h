/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tcpstats/abi.h — the kernel/user ABI of the kernel TCP statistics (bpf/tcp_stats.c).
 * Mirrored by agent/telemetry/tcpstats_abi.py; tests/unit/test_telemetry_tcpstats.py compiles this
 * header with gcc and compares every size, offset and constant with the mirror.
 *
 * Kept apart from include/tcpmesh_abi.h on purpose: the capture mode's pin names hash that header
 * (and lib/, include/), so a change here must not make the capture reload, and vice versa.
 */
#ifndef TCPMESH_TCPSTATS_ABI_H
#define TCPMESH_TCPSTATS_ABI_H

#include <linux/types.h>

#define TCPMESH_STATS_ABI_VERSION 1

/* RTT histogram: bucket i (0 <= i < TCPMESH_RTT_BOUNDED) counts samples <= 2^(i + FIRST_SHIFT) us,
 * i.e. 16 us, 32 us, ... 8.39 s; the last bucket counts samples above that (only in +Inf). */
#define TCPMESH_RTT_FIRST_SHIFT 4
#define TCPMESH_RTT_BOUNDED 20
#define TCPMESH_RTT_BUCKETS (TCPMESH_RTT_BOUNDED + 1)

/* How many series (reporter x leg x identity pair) the kernel keeps at once. */
#ifndef TCPMESH_STATS_SLOTS
#define TCPMESH_STATS_SLOTS 4096
#endif
/* How many sockets can be registered at once (LRU beyond that). */
#ifndef TCPMESH_STATS_SOCKETS
#define TCPMESH_STATS_SOCKETS 65536
#endif

/* A registered socket: its series, and how many of its retransmissions were counted already.
 * Retransmits are counted from the socket's own total_retrans (which also counts tail loss probes,
 * for which the kernel has no RETRANS_CB), at every callback. 8 bytes. */
struct tcpmesh_stats_sock {
	__u32 slot;          /* 0 index into tcpmesh_stats_pairs */
	__u32 retrans_seen;  /* 4 total_retrans already added (user space: TCP_INFO at registration) */
};

/* One series' statistics; per CPU, summed by user space at scrape time. 192 bytes, no padding. */
struct tcpmesh_tcp_stats {
	__u64 retransmits;                     /*  0 segments retransmitted (total_retrans deltas) */
	__u64 rtt_samples;                     /*  8 BPF_SOCK_OPS_RTT_CB calls */
	__u64 rtt_sum_us;                      /* 16 sum of the smoothed RTT at each sample */
	__u64 rtt_buckets[TCPMESH_RTT_BUCKETS]; /* 24 non-cumulative counts */
};

/* Reason counters (tcpmesh_stats_counters); codes are never reused. */
enum tcpmesh_stats_reason {
	TCPMESH_SR_UNTRACKED = 0, /* a callback for a socket user space did not register */
	TCPMESH_SR_BAD_SLOT = 1,  /* a registered socket points outside the slot array */
	TCPMESH_SR_FORGOTTEN = 2, /* a registered socket closed and was removed */
	TCPMESH_SR_ENABLED = 3,   /* callbacks enabled on an established socket */
	TCPMESH_SR_MAX = 4,
	TCPMESH_SR_SLOTS = 16,
};

#endif
