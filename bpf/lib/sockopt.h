/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sockopt.h — writing getsockopt(SOL_IP, SO_ORIGINAL_DST | TCPMESH_SO_ORIGIN) answers.
 * The kernel has already run its own getsockopt (ENOPROTOOPT/ENOENT for these options); on
 * success the hook overrides optval, optlen and retval. No map access here.
 */
#ifndef TCPMESH_LIB_SOCKOPT_H
#define TCPMESH_LIB_SOCKOPT_H

#include <uapi/linux/errno.h>
#include "tcpmesh_abi.h"
#include "lib/origin.h"

static __always_inline int tcpmesh_is_origin_query(const struct bpf_sockopt *ctx)
{
	if (ctx->level == TCPMESH_SOL_IPV6)
		return ctx->optname == TCPMESH_IP6T_SO_ORIGINAL_DST;
	return ctx->level == TCPMESH_SOL_IP &&
	       (ctx->optname == TCPMESH_SO_ORIGINAL_DST || ctx->optname == TCPMESH_SO_ORIGIN);
}

/* Set the caller's optlen and clear the error. clang -O2 merges two adjacent 32-bit ctx stores
 * into one 8-byte store that the verifier rejects (off=32 size=8): keep them volatile. */
static __always_inline void tcpmesh_sockopt_succeed(struct bpf_sockopt *ctx, __s32 optlen)
{
	*(volatile __s32 *)&ctx->optlen = optlen;
	*(volatile __s32 *)&ctx->retval = 0;
}

/* Returns the reason code to count: answered, or TCPMESH_R_OPTLEN_SHORT. */
static __always_inline int tcpmesh_answer_original_dst(struct bpf_sockopt *ctx,
						       const struct tcpmesh_origin *origin)
{
	struct tcpmesh_sockaddr_in *sa = ctx->optval;

	if (tcpmesh_origin_is_ip6(origin))
		return TCPMESH_R_FAMILY_MISMATCH; /* sockaddr_in cannot hold it */
	if ((void *)(sa + 1) > ctx->optval_end)
		return TCPMESH_R_OPTLEN_SHORT;
	sa->family = TCPMESH_AF_INET;
	sa->port = origin->dst_port;
	sa->addr = origin->dst_ip4;
	__builtin_memset(sa->zero, 0, sizeof(sa->zero));
	tcpmesh_sockopt_succeed(ctx, sizeof(*sa));
	return TCPMESH_R_ORIGDST_ANSWERED;
}

/* SOL_IPV6/IP6T_SO_ORIGINAL_DST: the destination as a sockaddr_in6 (IPv4 as ::ffff:a.b.c.d). */
static __always_inline int tcpmesh_answer_original_dst6(struct bpf_sockopt *ctx, const struct tcpmesh_origin *origin)
{
	struct tcpmesh_sockaddr_in6 *sa = ctx->optval;

	if ((void *)(sa + 1) > ctx->optval_end)
		return TCPMESH_R_OPTLEN_SHORT;
	sa->family = 10; /* AF_INET6 */
	sa->port = origin->dst_port;
	sa->flowinfo = 0;
	if (tcpmesh_origin_is_ip6(origin)) {
		sa->addr[0] = origin->dst_ip6[0];
		sa->addr[1] = origin->dst_ip6[1];
		sa->addr[2] = origin->dst_ip6[2];
		sa->addr[3] = origin->dst_ip6[3];
	} else {
		sa->addr[0] = 0;
		sa->addr[1] = 0;
		sa->addr[2] = bpf_htonl(0xffff);
		sa->addr[3] = origin->dst_ip4;
	}
	sa->scope_id = 0;
	tcpmesh_sockopt_succeed(ctx, sizeof(*sa));
	return TCPMESH_R_ORIGDST_ANSWERED;
}

static __always_inline int tcpmesh_answer_origin(struct bpf_sockopt *ctx, const struct tcpmesh_origin *origin)
{
	struct tcpmesh_origin *out = ctx->optval;

	if ((void *)(out + 1) > ctx->optval_end)
		return TCPMESH_R_OPTLEN_SHORT;
	__builtin_memcpy(out, origin, sizeof(*out));
	tcpmesh_sockopt_succeed(ctx, sizeof(*out));
	return TCPMESH_R_ORIGIN_ANSWERED;
}

static __always_inline int tcpmesh_answer(struct bpf_sockopt *ctx, const struct tcpmesh_origin *origin)
{
	if (ctx->level == TCPMESH_SOL_IPV6)
		return tcpmesh_answer_original_dst6(ctx, origin);
	if (ctx->optname == TCPMESH_SO_ORIGIN)
		return tcpmesh_answer_origin(ctx, origin);
	return tcpmesh_answer_original_dst(ctx, origin);
}

#endif /* TCPMESH_LIB_SOCKOPT_H */
