/* SPDX-License-Identifier: Apache-2.0 */
/*
 * splice.c — the same-node kernel splice (docs/performance-latency.md, "The kernel splice").
 *
 *   sk_skb stream verdict (attached to tcpmesh_splice_peers)
 *       every skb arriving on a spliced socket goes on to the egress of the other socket of its
 *       pair (bpf_sk_redirect_hash under the arriving socket's own cookie; splice/maps.h).
 *
 * The agent puts a pair in the map only after it authorized and recorded the connection and the
 * workload accepted it (agent/proxy/splice.py); policy, identity and telemetry stay in user space.
 * Fail-open to the socket itself, never to another socket: an skb whose socket has no peer in the
 * map (its pair is being taken apart) stays in the socket's own queue (counted as no_peer); bytes
 * are never dropped and never go anywhere but the pair user space wrote. Only an skb without
 * payload (a FIN alone) is dropped: below.
 * Build: agent/proxy/splice.py asks the loader process (agent/bpf/loader.py) to compile this file
 * with bcc and pin the program and maps. Map operations stay in this file (bcc rewrites them only
 * in the main source file).
 */
#include <uapi/linux/bpf.h>
#include "splice/abi.h"
#include "splice/maps.h"

static __always_inline void tcpmesh_splice_count(int reason)
{
	__u64 *value = tcpmesh_splcnt.lookup(&reason);

	if (value)
		*value += 1; /* this CPU's slot */
}

int tcpmesh_splice(struct __sk_buff *skb)
{
	__u64 cookie;

	/* 6.x hands the FIN's skb to the verdict too (tcp_read_skb), without payload. Neither way on is
	 * safe: redirected, the peer's backlog "sends" 0 bytes; passed while this socket's own backlog is
	 * busy (it is a redirect target too), it is queued there and "received" as 0 bytes — either is
	 * taken for a broken pipe (EPIPE on the socket, forwarding stopped). It carries no byte, and TCP
	 * has already recorded the FIN in the socket's state, where the agent sees it (EPOLLRDHUP): drop it. */
	if (skb->len == 0) {
		tcpmesh_splice_count(TCPMESH_SPR_EMPTY);
		return SK_DROP;
	}
	cookie = bpf_get_socket_cookie(skb);
	if (tcpmesh_splice_peers.sk_redirect_hash(skb, &cookie, 0) == SK_PASS) {
		tcpmesh_splice_count(TCPMESH_SPR_REDIRECTED);
		return SK_PASS;
	}
	tcpmesh_splice_count(TCPMESH_SPR_NO_PEER);
	return SK_PASS;
}
