/* SPDX-License-Identifier: Apache-2.0 */
/*
 * origin.h — building a struct tcpmesh_origin and the keys it is stored under, from each hook's
 * context. No map access here (see capture_connect.c for why).
 */
#ifndef TCPMESH_LIB_ORIGIN_H
#define TCPMESH_LIB_ORIGIN_H

#include "tcpmesh_abi.h"

#define TCPMESH_AF_INET 2

/* connect4/6 context: where the app wanted to go and who it is. ``dst6``: an IPv6 destination
 * (then ``dst`` is 0), or all zero for an IPv4 one. Every field is written: a slot is reused. */
static __always_inline void tcpmesh_fill_origin(struct bpf_sock_addr *ctx, __u32 dst, const __u32 *dst6,
						__u64 cookie, struct tcpmesh_origin *origin)
{
	origin->dst_ip4 = dst;
	origin->dst_ip6[0] = dst6[0];
	origin->dst_ip6[1] = dst6[1];
	origin->dst_ip6[2] = dst6[2];
	origin->dst_ip6[3] = dst6[3];
	origin->dst_port = (__u16)ctx->user_port; /* user_port: network order in the low 16 bits */
	origin->version = TCPMESH_ABI_VERSION;
	origin->pid = bpf_get_current_pid_tgid() >> 32;
	origin->uid = (__u32)bpf_get_current_uid_gid();
	origin->cgroup_id = bpf_get_current_cgroup_id();
	origin->cookie = cookie;
	bpf_get_current_comm(&origin->comm, sizeof(origin->comm));
}

/* connect4/6 context: the event of a connect to a destination outside the mesh. */
static __always_inline void tcpmesh_fill_egress_event(struct bpf_sock_addr *ctx, __u8 family, const __u32 *addr,
						      int denied, struct tcpmesh_egress_event *event)
{
	event->cgroup_id = bpf_get_current_cgroup_id();
	event->pid = bpf_get_current_pid_tgid() >> 32;
	event->uid = (__u32)bpf_get_current_uid_gid();
	event->addr[0] = addr[0];
	event->addr[1] = addr[1];
	event->addr[2] = addr[2];
	event->addr[3] = addr[3];
	event->port = (__u16)ctx->user_port;
	event->family = family;
	event->denied = denied ? 1 : 0;
	event->pad = 0;
	bpf_get_current_comm(&event->comm, sizeof(event->comm));
}

/* connect4/connect6 context: set the peer address. ``mapped`` (a constant after inlining, so the
 * other family's ctx fields are never touched) selects ::ffff:a.b.c.d for AF_INET6 sockets. */
static __always_inline void tcpmesh_set_peer(struct bpf_sock_addr *ctx, int mapped, __u32 ip4, __u32 port_be)
{
	if (mapped) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = ip4;
	} else {
		ctx->user_ip4 = ip4;
	}
	ctx->user_port = port_be;
}

/* getpeername6 context: show a native IPv6 destination. */
static __always_inline void tcpmesh_set_peer6(struct bpf_sock_addr *ctx, const __u32 *ip6, __u32 port_be)
{
	*(volatile __u32 *)&ctx->user_ip6[0] = ip6[0]; /* 4-byte ctx stores: clang would merge two */
	*(volatile __u32 *)&ctx->user_ip6[1] = ip6[1];
	*(volatile __u32 *)&ctx->user_ip6[2] = ip6[2];
	*(volatile __u32 *)&ctx->user_ip6[3] = ip6[3];
	ctx->user_port = port_be;
}

static __always_inline int tcpmesh_origin_is_ip6(const struct tcpmesh_origin *origin)
{
	return (origin->dst_ip6[0] | origin->dst_ip6[1] | origin->dst_ip6[2] | origin->dst_ip6[3]) != 0;
}

/* connect6 context: ::1 or :: (this host), never captured. */
static __always_inline int tcpmesh_ip6_local(const __u32 *ip6)
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && (ip6[3] == 0 || ip6[3] == bpf_htonl(1));
}

/* connect4/connect6 context: send the connection to the node's outbound proxy instead. */
static __always_inline void tcpmesh_redirect(struct bpf_sock_addr *ctx, int mapped)
{
	tcpmesh_set_peer(ctx, mapped, bpf_htonl(REDIR_IP), bpf_htons(REDIR_PORT));
}

/* sockops context: remote_port holds the network-order port in its high half on little endian;
 * bpf_ntohl() gives the host-order port on both byte orders. local_port is host order. */
static __always_inline __u16 tcpmesh_remote_port(const struct bpf_sock_ops *skops)
{
	return (__u16)bpf_ntohl(skops->remote_port);
}

/* pod sockops context: does this socket talk to the redirect address (captured, or dialled)? */
static __always_inline int tcpmesh_dials_redirect(const struct bpf_sock_ops *skops)
{
	return skops->remote_ip4 == bpf_htonl(REDIR_IP) && tcpmesh_remote_port(skops) == REDIR_PORT;
}

/* pod sockops at ACTIVE_ESTABLISHED: the client's view of its connection (see tcpmesh_peer_key).
 * client_seq is the client's ISN + 1 read as snd_una - bytes_acked + 1 (bytes_acked counts the
 * SYN's sequence number on the active side), not snd_nxt: with TCP Fast Open (sendto
 * MSG_FASTOPEN, TCP_FASTOPEN_CONNECT) the SYN carried data, so snd_nxt is past it and the proxy,
 * which did not take the SYN's data, would never find the record (the connection was reset as
 * "not captured"). Without Fast Open both equal snd_nxt, as tcpmesh_abi.h's key comment says (left
 * unchanged there: that header names the maps' pin directory, and the maps did not change). */
static __always_inline void tcpmesh_peer_key_of_client(const struct bpf_sock_ops *skops,
						       struct tcpmesh_peer_key *key)
{
	key->ip4 = skops->local_ip4;
	key->port = bpf_htons((__u16)skops->local_port);
	key->pad = 0;
	key->client_seq = skops->snd_una - (__u32)skops->bytes_acked + 1;
	key->server_seq = skops->rcv_nxt;
}

/* getsockopt context: the same connection seen from the proxy's accepted socket, whatever it has
 * received or sent since: rcv_nxt - bytes_received and snd_una - bytes_acked are the two initial
 * sequence numbers + 1 (both byte counts include a FIN's sequence number, as rcv_nxt and snd_una
 * do). bpf_tcp_sock() reads the socket, no map: allowed in a header. */
static __always_inline int tcpmesh_peer_key_of_accepted(struct bpf_sock *sk, struct tcpmesh_peer_key *key)
{
	struct bpf_tcp_sock *tp;

	if (!sk || sk->family != TCPMESH_AF_INET) /* the proxy listens on AF_INET */
		return -1;
	tp = bpf_tcp_sock(sk);
	if (!tp)
		return -1;
	key->ip4 = sk->dst_ip4;
	key->port = sk->dst_port; /* network order */
	key->pad = 0;
	key->client_seq = tp->rcv_nxt - (__u32)tp->bytes_received;
	key->server_seq = tp->snd_una - (__u32)tp->bytes_acked;
	return 0;
}

/* getpeername4/6 context: is the peer the kernel reports the redirect address? Only then is the
 * socket's record about this connection (a socket may connect() again after a failure). */
static __always_inline int tcpmesh_peer_is_redirect(const struct bpf_sock_addr *ctx, int mapped)
{
	__u32 ip4;

	if (mapped) {
		if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 || ctx->user_ip6[2] != bpf_htonl(0xffff))
			return 0;
		ip4 = ctx->user_ip6[3];
	} else {
		ip4 = ctx->user_ip4;
	}
	return ip4 == bpf_htonl(REDIR_IP) && ctx->user_port == bpf_htons(REDIR_PORT);
}

#endif /* TCPMESH_LIB_ORIGIN_H */
