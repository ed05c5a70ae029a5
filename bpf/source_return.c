/* SPDX-License-Identifier: Apache-2.0 */
/*
 * source_return.c — the return path of inbound legs that keep the client pod's address
 * (agent/capture/source_return.py, docs/capture-source-address.md).
 *
 *   tc cls_bpf, direct-action, on ingress of the node-side veth of each local pod, every capture
 *   mode: a TCP packet (IPv4 or IPv6) whose 4-tuple is a socket of the node's network namespace
 *   carrying TCPMESH_SOURCE_MARK (the inbound proxy's IP_TRANSPARENT leg to this pod) gets
 *   TCPMESH_STEER_MARK, which the node's `ip rule fwmark ... lookup <table>` + `local 0.0.0.0/0`
 *   (and `local ::/0`) turn into local delivery to that socket — instead of being forwarded to the
 *   client pod's own node, whose address the leg borrowed.
 *
 * Build: BPF(src_file=..., cflags=["-I<repo>/bpf", "-I<repo>/bpf/include"]); no maps.
 * Return values: TC_ACT_OK = ours, deliver locally (no later filter needs to see a reply to the
 * proxy); TC_ACT_UNSPEC (-1) = not ours, the next filter (ebpf-tc capture) or the stack decides.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include "tcpmesh_abi.h"

#define TCPMESH_ETH_HLEN 14
#define TCPMESH_IP4_HLEN_MIN 20
#define TCPMESH_IP6_HLEN 40
#define TCPMESH_PROTO_TCP 6

/* The 4-tuple of an IPv4 TCP packet as bpf_sk_lookup_tcp wants it (source = the remote end). */
static __always_inline int tcpmesh_ret_tuple4(struct __sk_buff *skb, struct bpf_sock_tuple *t)
{
	__u8 vihl, proto;
	__u16 frag;
	__u32 ihl;

	if (bpf_skb_load_bytes(skb, TCPMESH_ETH_HLEN, &vihl, 1) ||
	    bpf_skb_load_bytes(skb, TCPMESH_ETH_HLEN + 9, &proto, 1) ||
	    bpf_skb_load_bytes(skb, TCPMESH_ETH_HLEN + 6, &frag, 2))
		return -1;
	if (proto != TCPMESH_PROTO_TCP || (frag & bpf_htons(0x1fff)) != 0)
		return -1; /* not TCP, or a fragment without the TCP header */
	ihl = (__u32)(vihl & 0x0f) * 4;
	if (ihl < TCPMESH_IP4_HLEN_MIN)
		return -1;
	if (bpf_skb_load_bytes(skb, TCPMESH_ETH_HLEN + 12, &t->ipv4.saddr, 8) ||
	    bpf_skb_load_bytes(skb, TCPMESH_ETH_HLEN + ihl, &t->ipv4.sport, 4))
		return -1;
	return sizeof(t->ipv4);
}

/* IPv6: a TCP header right after the fixed header (a reply from a pod carries no extension header). */
static __always_inline int tcpmesh_ret_tuple6(struct __sk_buff *skb, struct bpf_sock_tuple *t)
{
	__u8 next;

	if (bpf_skb_load_bytes(skb, TCPMESH_ETH_HLEN + 6, &next, 1) || next != TCPMESH_PROTO_TCP)
		return -1;
	if (bpf_skb_load_bytes(skb, TCPMESH_ETH_HLEN + 8, t->ipv6.saddr, 32) ||
	    bpf_skb_load_bytes(skb, TCPMESH_ETH_HLEN + TCPMESH_IP6_HLEN, &t->ipv6.sport, 4))
		return -1;
	return sizeof(t->ipv6);
}

/* Does the packet belong to an inbound leg that borrowed the client's address? */
static __always_inline int tcpmesh_ret_ours(struct __sk_buff *skb)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	int size = -1;
	int ours;

	if (skb->protocol == bpf_htons(ETH_P_IP))
		size = tcpmesh_ret_tuple4(skb, &t);
	else if (skb->protocol == bpf_htons(ETH_P_IPV6))
		size = tcpmesh_ret_tuple6(skb, &t);
	if (size < 0)
		return 0;
	sk = bpf_sk_lookup_tcp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	ours = (sk->mark & TCPMESH_SOURCE_MARK) != 0;
	bpf_sk_release(sk);
	return ours;
}

/* ---- hook ------------------------------------------------------------------------------------ */

/*
 * tc ingress of a pod's node-side veth — FAIL-OPEN: a packet that is not a reply to a marked
 * proxy socket passes untouched. A reply this program misses is forwarded to the client's node,
 * where no socket owns it: the inbound leg times out (the client sees UNREACHABLE), nothing leaks.
 */
int tcpmesh_ret_in(struct __sk_buff *skb)
{
	if (!tcpmesh_ret_ours(skb))
		return TC_ACT_UNSPEC;
	skb->mark |= TCPMESH_STEER_MARK;
	return TC_ACT_OK;
}
