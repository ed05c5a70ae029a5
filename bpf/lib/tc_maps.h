/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tc_maps.h — every map of the ebpf-tc capture mode (bpf/capture_tc.c), in one place.
 * Each entry says who writes it, who reads it, and what bounds it. Names carry the tcpmesh_tc_
 * prefix so they stay distinct after the kernel's 15-character truncation (tcpmesh_tc_cidr,
 * tcpmesh_tc_flow, tcpmesh_tc_coun) and from the ebpf-connect maps.
 */
#ifndef TCPMESH_LIB_TC_MAPS_H
#define TCPMESH_LIB_TC_MAPS_H

#include "tcpmesh_abi.h"

#ifndef TCPMESH_MAX_CONNS
#define TCPMESH_MAX_CONNS 65536
#endif
#ifndef TCPMESH_MAX_CIDRS
#define TCPMESH_MAX_CIDRS 1024
#endif

/* The 4-tuple of a captured connection as the pod sent it (all fields network order). Kernel
 * only: user space neither reads nor writes tcpmesh_tc_flows. */
struct tcpmesh_tc_flow_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

/*
 * tcpmesh_tc_cidrs: LPM trie, destination prefix -> struct tcpmesh_cidr_value.
 *   writer:   user space only (agent/capture/tc_mode.py): the capture CIDRs (default 0.0.0.0/0),
 *             bypass CIDRs, and every address of the node as a BYPASS /32 (never capture the
 *             node itself: its admin port, DNS, kubelet ...).
 *   reader:   tcpmesh_tc_in, per packet (longest prefix decides; no match = not captured).
 *   eviction: none; user space owns the content.
 */
BPF_LPM_TRIE(tcpmesh_tc_cidrs, struct tcpmesh_cidr_key, struct tcpmesh_cidr_value, TCPMESH_MAX_CIDRS);

/*
 * tcpmesh_tc_flows: 4-tuple of every SYN assigned to the proxy listener -> ktime of that SYN.
 *   writer:   tcpmesh_tc_in when it assigns a SYN.
 *   reader:   tcpmesh_tc_in for a non-SYN packet that has no proxy socket: a hit means a captured
 *             connection whose proxy side is gone, so the packet is dropped instead of being
 *             forwarded in plaintext; a miss means it was never ours (passed).
 *   eviction: LRU; an evicted record only turns that late orphan packet from dropped into passed
 *             (the destination then answers RST: it never saw the SYN).
 */
BPF_TABLE("lru_hash", struct tcpmesh_tc_flow_key, __u64, tcpmesh_tc_flows, TCPMESH_MAX_CONNS);

/*
 * tcpmesh_tc_counters: per-CPU array indexed by enum tcpmesh_tc_reason.
 *   writer:   tcpmesh_tc_in (tcpmesh_tc_count()).
 *   reader:   user space, summed over CPUs at read time (TcCapture.counters()).
 *   eviction: none; fixed size TCPMESH_TC_R_MAX.
 */
BPF_PERCPU_ARRAY(tcpmesh_tc_counters, __u64, TCPMESH_TC_R_MAX);

#endif /* TCPMESH_LIB_TC_MAPS_H */
