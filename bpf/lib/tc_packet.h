/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tc_packet.h — reading the IPv4/TCP headers of a packet at tc ingress, and the fixed part of
 * "is this destination ever captured?". No map access here (see capture_connect.c for why).
 */
#ifndef TCPMESH_LIB_TC_PACKET_H
#define TCPMESH_LIB_TC_PACKET_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include "tcpmesh_abi.h"

/* Not a reason code: "read fine, look further". */
#define TCPMESH_TC_CANDIDATE (-1)

/* Ethernet + the longest IPv4 header + a TCP header without options. */
#define TCPMESH_TC_PULL_LEN (sizeof(struct ethhdr) + 60 + sizeof(struct tcphdr))

struct tcpmesh_tc_packet {
	__u32 saddr;   /* network order */
	__u32 daddr;   /* network order */
	__u16 sport;   /* network order */
	__u16 dport;   /* network order */
	__u8 syn;
	__u8 ack;
};

/* The addresses, ports and SYN/ACK flags of an IPv4 TCP packet, or the reason to leave it:
 * NOT_TCP, or SHORT when the headers are not in the linear part (the caller pulls and retries). */
static __always_inline int tcpmesh_tc_read(struct __sk_buff *skb, struct tcpmesh_tc_packet *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph;
	struct tcphdr *th;
	__u32 ihl;

	if ((void *)(eth + 1) > data_end)
		return TCPMESH_TC_R_SHORT;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return TCPMESH_TC_R_NOT_TCP;
	iph = (void *)(eth + 1);
	if ((void *)(iph + 1) > data_end)
		return TCPMESH_TC_R_SHORT;
	/* a non-first fragment carries no TCP header */
	if (iph->protocol != IPPROTO_TCP || (iph->frag_off & bpf_htons(0x1fff)) != 0)
		return TCPMESH_TC_R_NOT_TCP;
	ihl = (__u32)iph->ihl * 4;
	if (ihl < sizeof(*iph))
		return TCPMESH_TC_R_NOT_TCP;
	th = (void *)iph + ihl; /* IP options are skipped, not refused */
	if ((void *)(th + 1) > data_end)
		return TCPMESH_TC_R_SHORT;
	pkt->saddr = iph->saddr;
	pkt->daddr = iph->daddr;
	pkt->sport = th->source;
	pkt->dport = th->dest;
	pkt->syn = th->syn;
	pkt->ack = th->ack;
	return TCPMESH_TC_CANDIDATE;
}

/* Destinations never captured whatever the CIDR map says: loopback and 0.0.0.0/8. */
static __always_inline int tcpmesh_tc_fixed_verdict(const struct tcpmesh_tc_packet *pkt)
{
	__u32 first_octet = bpf_ntohl(pkt->daddr) >> 24;

	if (first_octet == 127 || first_octet == 0)
		return TCPMESH_TC_R_LOOPBACK;
	return TCPMESH_TC_CANDIDATE;
}

/* A packet that opens a connection: SYN without ACK. */
static __always_inline int tcpmesh_tc_opens(const struct tcpmesh_tc_packet *pkt)
{
	return pkt->syn && !pkt->ack;
}

static __always_inline void tcpmesh_tc_tuple(const struct tcpmesh_tc_packet *pkt, struct bpf_sock_tuple *t)
{
	t->ipv4.saddr = pkt->saddr;
	t->ipv4.daddr = pkt->daddr;
	t->ipv4.sport = pkt->sport;
	t->ipv4.dport = pkt->dport;
}

static __always_inline void tcpmesh_tc_flow_key_of(const struct tcpmesh_tc_packet *pkt,
						   struct tcpmesh_tc_flow_key *key)
{
	key->saddr = pkt->saddr;
	key->daddr = pkt->daddr;
	key->sport = pkt->sport;
	key->dport = pkt->dport;
}

#endif /* TCPMESH_LIB_TC_PACKET_H */
