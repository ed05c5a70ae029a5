/* SPDX-License-Identifier: Apache-2.0 */
/*
 * capture_policy.h — the fixed part of "is this connect() captured?": no map access.
 * Returns TCPMESH_R_CAPTURED when the destination is a candidate (the capture-CIDR lookup in
 * capture_connect.c then decides), or the reason it is left alone.
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

static __always_inline int tcpmesh_fixed_verdict(const struct bpf_sock_addr *ctx)
{
	__u32 dst = ctx->user_ip4; /* network order */
	__u32 first_octet = bpf_ntohl(dst) >> 24;

	if (ctx->type != TCPMESH_SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return TCPMESH_R_NOT_TCP;
	if (first_octet == 127 || first_octet == 0) /* loopback, and 0.0.0.0/8 ("this host") */
		return TCPMESH_R_LOOPBACK;
	if (dst == bpf_htonl(REDIR_IP))
		return TCPMESH_R_TO_REDIRECT;
	return TCPMESH_R_CAPTURED;
}

/* The LPM key that finds the longest capture/bypass prefix holding ctx's destination. */
static __always_inline void tcpmesh_cidr_key_of(const struct bpf_sock_addr *ctx, struct tcpmesh_cidr_key *key)
{
	key->prefixlen = 32;
	key->ip4 = ctx->user_ip4;
}

#endif /* TCPMESH_LIB_CAPTURE_POLICY_H */
