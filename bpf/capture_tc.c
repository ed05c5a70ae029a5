/* SPDX-License-Identifier: Apache-2.0 */
/*
 * capture_tc.c — the ebpf-tc capture mode (docs/capture.md).
 *
 *   tc cls_bpf, direct-action, on ingress of the node-side veth of each local pod:
 *     a packet of a connection the proxy already owns      -> bpf_sk_assign to that socket
 *     a SYN to a captured destination                       -> bpf_sk_assign to the proxy's
 *                                                              IP_TRANSPARENT listener
 *     either way the skb gets TCPMESH_STEER_MARK, which the node's `ip rule fwmark ... lookup
 *     <table>` + `local 0.0.0.0/0 dev lo table <table>` turn into local delivery.
 *   The proxy reads the original destination with getsockname() on the accepted socket.
 *
 * Build: BPF(src_file=..., cflags=["-I<repo>/bpf", "-I<repo>/bpf/include",
 *                                   "-DPROXY_IP=<host-order u32>u", "-DPROXY_PORT=<port>"]).
 * PROXY_IP:PROXY_PORT is where the listener lookup goes (127.0.0.1 finds a 0.0.0.0 listener).
 *
 * Layout as in capture_connect.c: map-touching helpers here (bcc rewrites map operations only in
 * the main file), packet parsing in lib/tc_packet.h, maps in lib/tc_maps.h, one thin hook.
 * Return values: TC_ACT_UNSPEC (-1) = not ours, let the next filter / the stack decide;
 * TC_ACT_OK = assigned, deliver; TC_ACT_SHOT = drop.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include "tcpmesh_abi.h"
#include "lib/tc_maps.h"
#include "lib/tc_packet.h"

#ifndef PROXY_IP
#error "PROXY_IP (proxy listener IPv4 address, host-order integer) must be passed as a -D flag"
#endif
#ifndef PROXY_PORT
#error "PROXY_PORT (proxy listener TCP port) must be passed as a -D flag"
#endif

#define TCPMESH_TCP_LISTEN 10 /* BPF_TCP_LISTEN */

/* ---- helpers that touch maps ----------------------------------------------------------------- */

static __always_inline void tcpmesh_tc_count(int reason)
{
	__u64 *value = tcpmesh_tc_counters.lookup(&reason);

	if (value)
		*value += 1; /* this CPU's slot: no other writer */
}

static __always_inline int tcpmesh_tc_cidr_verdict(__u32 daddr)
{
	struct tcpmesh_cidr_key key = {};
	struct tcpmesh_cidr_value *cidr;

	key.prefixlen = 32;
	key.ip4 = daddr;
	cidr = tcpmesh_tc_cidrs.lookup(&key);
	if (!cidr || cidr->action != TCPMESH_CIDR_CAPTURE)
		return TCPMESH_TC_R_NOT_CAPTURED;
	return TCPMESH_TC_CANDIDATE;
}

/* Read the headers, pulling them into the linear part once if needed; then the scope checks. */
static __always_inline int tcpmesh_tc_classify(struct __sk_buff *skb, struct tcpmesh_tc_packet *pkt)
{
	int verdict = tcpmesh_tc_read(skb, pkt);

	if (verdict == TCPMESH_TC_R_SHORT) {
		bpf_skb_pull_data(skb, skb->len < TCPMESH_TC_PULL_LEN ? skb->len : TCPMESH_TC_PULL_LEN);
		verdict = tcpmesh_tc_read(skb, pkt);
	}
	if (verdict == TCPMESH_TC_CANDIDATE)
		verdict = tcpmesh_tc_fixed_verdict(pkt);
	if (verdict == TCPMESH_TC_CANDIDATE)
		verdict = tcpmesh_tc_cidr_verdict(pkt->daddr);
	return verdict;
}

/* Assign the packet to ``sk`` (a reference we own and release here) and mark it for local
 * delivery. A failed assignment drops the packet: it must not be forwarded in plaintext. */
static __always_inline int tcpmesh_tc_assign(struct __sk_buff *skb, struct bpf_sock *sk, int reason)
{
	long err = bpf_sk_assign(skb, sk, 0);

	bpf_sk_release(sk);
	if (err) {
		tcpmesh_tc_count(TCPMESH_TC_R_ASSIGN_FAILED);
		return TC_ACT_SHOT;
	}
	skb->mark |= TCPMESH_STEER_MARK;
	tcpmesh_tc_count(reason);
	return TC_ACT_OK;
}

/* A non-SYN packet that no local socket owns: ours only if we captured its SYN. */
static __always_inline int tcpmesh_tc_unowned(const struct tcpmesh_tc_packet *pkt)
{
	struct tcpmesh_tc_flow_key key = {};

	tcpmesh_tc_flow_key_of(pkt, &key);
	if (tcpmesh_tc_flows.lookup(&key)) {
		tcpmesh_tc_count(TCPMESH_TC_R_ORPHAN_DROPPED);
		return TC_ACT_SHOT;
	}
	tcpmesh_tc_count(TCPMESH_TC_R_NOT_OURS);
	return TC_ACT_UNSPEC;
}

/* A SYN to capture: assign it to the proxy listener and remember its 4-tuple. */
static __always_inline int tcpmesh_tc_to_listener(struct __sk_buff *skb, const struct tcpmesh_tc_packet *pkt)
{
	struct bpf_sock_tuple t = {};
	struct tcpmesh_tc_flow_key key = {};
	struct bpf_sock *sk;
	__u64 now = bpf_ktime_get_ns();

	t.ipv4.saddr = pkt->saddr;
	t.ipv4.sport = pkt->sport;
	t.ipv4.daddr = bpf_htonl(PROXY_IP);
	t.ipv4.dport = bpf_htons(PROXY_PORT);
	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk) {
		tcpmesh_tc_count(TCPMESH_TC_R_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	if (sk->state != TCPMESH_TCP_LISTEN) {
		bpf_sk_release(sk);
		tcpmesh_tc_count(TCPMESH_TC_R_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	tcpmesh_tc_flow_key_of(pkt, &key);
	if (tcpmesh_tc_flows.update(&key, &now) != 0)
		tcpmesh_tc_count(TCPMESH_TC_R_MAP_UPDATE_FAILED);
	return tcpmesh_tc_assign(skb, sk, TCPMESH_TC_R_SYN_ASSIGNED);
}

static __always_inline int tcpmesh_tc_steer(struct __sk_buff *skb, const struct tcpmesh_tc_packet *pkt)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;

	tcpmesh_tc_tuple(pkt, &t);
	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		/* a connection the proxy accepted (or is accepting, or in TIME_WAIT) */
		if (sk->state != TCPMESH_TCP_LISTEN)
			return tcpmesh_tc_assign(skb, sk, TCPMESH_TC_R_EST_ASSIGNED);
		bpf_sk_release(sk); /* some listener on the original port: not the proxy */
	}
	if (!tcpmesh_tc_opens(pkt))
		return tcpmesh_tc_unowned(pkt);
	return tcpmesh_tc_to_listener(skb, pkt);
}

/* ---- hook ------------------------------------------------------------------------------------ */

/*
 * tc ingress of a pod's node-side veth — FAIL-CLOSED for captured destinations: a SYN with no
 * proxy listener (agent down), a failed assignment, or a late packet of a captured connection
 * whose proxy socket is gone is dropped, never forwarded. Everything out of scope (not IPv4 TCP,
 * loopback, node addresses, bypassed CIDRs, a pod answering as a server) is passed untouched.
 */
int tcpmesh_tc_in(struct __sk_buff *skb)
{
	struct tcpmesh_tc_packet pkt = {};
	int verdict = tcpmesh_tc_classify(skb, &pkt);

	if (verdict != TCPMESH_TC_CANDIDATE) {
		tcpmesh_tc_count(verdict);
		return TC_ACT_UNSPEC;
	}
	return tcpmesh_tc_steer(skb, &pkt);
}
