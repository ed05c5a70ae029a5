/* SPDX-License-Identifier: Apache-2.0 */
/*
 * capture_policy.h — the fixed part of "is this connect() captured?": no map access.
 * IPv4 destinations, whether from an AF_INET socket (connect4) or as a v4-mapped address on a
 * dual-stack AF_INET6 socket (connect6); native IPv6 is decided in capture_connect.c
 * (tcpmesh_capture_connect6: the mesh map alone).
 */
#ifndef TCPMESH_LIB_CAPTURE_POLICY_H
#define TCPMESH_LIB_CAPTURE_POLICY_H

#include <uapi/linux/in.h>
#include "tcpmesh_abi.h"

#ifndef REDIR_IP
#error "REDIR_IP (redirect IPv4 address, host-order integer) must be passed as a -D flag"
#endif
#ifndef REDIR_PORT
#error "REDIR_PORT (redirect TCP port) must be passed as a -D flag"
#endif

#define TCPMESH_SOCK_STREAM 1

/* Socket type/protocol and destination (network order) -> CAPTURED (= a candidate: the CIDR
 * lookup decides) or the reason it is left alone. */
static __always_inline int tcpmesh_fixed_verdict(__u32 type, __u32 protocol, __u32 dst)
{
	__u32 first_octet = bpf_ntohl(dst) >> 24;

	if (type != TCPMESH_SOCK_STREAM || protocol != IPPROTO_TCP)
		return TCPMESH_R_NOT_TCP;
	if (first_octet == 127 || first_octet == 0) /* loopback, and 0.0.0.0/8 ("this host") */
		return TCPMESH_R_LOOPBACK;
	if (dst == bpf_htonl(REDIR_IP))
		return TCPMESH_R_TO_REDIRECT;
	return TCPMESH_R_CAPTURED;
}

/* connect6/getpeername6 context: the IPv4 address inside a v4-mapped destination
 * (::ffff:a.b.c.d, what dual-stack AF_INET6 sockets use for IPv4 peers), or -1. */
static __always_inline int tcpmesh_v4_mapped(const struct bpf_sock_addr *ctx, __u32 *dst)
{
	if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 || ctx->user_ip6[2] != bpf_htonl(0xffff))
		return -1;
	*dst = ctx->user_ip6[3];
	return 0;
}

/* The node guard's exemptions for a pod that is not captured (yet), IPv4 destination ``dst``
 * (network order): loopback and the redirect address (any port) stay reachable. */
static __always_inline int tcpmesh_guard_exempt4(__u32 dst)
{
	__u32 first_octet = bpf_ntohl(dst) >> 24;

	return first_octet == 127 || first_octet == 0 || dst == bpf_htonl(REDIR_IP);
}

/* The same for an AF_INET6 socket: ::1, or a v4-mapped address the IPv4 rule exempts. */
static __always_inline int tcpmesh_guard_exempt6(const struct bpf_sock_addr *ctx)
{
	__u32 dst = 0;

	if (ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 && ctx->user_ip6[2] == 0 &&
	    ctx->user_ip6[3] == bpf_htonl(1))
		return 1;
	return tcpmesh_v4_mapped(ctx, &dst) == 0 && tcpmesh_guard_exempt4(dst);
}

/* The node's admin port (-DTCPMESH_ADMIN_IP=<host-order u32>u -DTCPMESH_ADMIN_PORT=<port>, from
 * admin.address and admin.port; ADMIN_IP 0: admin.address 0.0.0.0, every address): is IPv4
 * ``dst``:``port_be`` (network order) it? Pods never get there: the agent serves probes and scrapes
 * from the node itself (docs/install-kubernetes.md). */
#ifdef TCPMESH_ADMIN_PORT
static __always_inline int tcpmesh_is_admin_port(__u32 dst, __u16 port_be)
{
	return port_be == bpf_htons(TCPMESH_ADMIN_PORT) && (TCPMESH_ADMIN_IP == 0 || dst == bpf_htonl(TCPMESH_ADMIN_IP));
}
#endif

static __always_inline int tcpmesh_is_tcp(__u32 type, __u32 protocol)
{
	return type == TCPMESH_SOCK_STREAM && protocol == IPPROTO_TCP;
}

#endif /* TCPMESH_LIB_CAPTURE_POLICY_H */
