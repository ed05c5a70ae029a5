/* SPDX-License-Identifier: Apache-2.0 */
/*
 * splice/abi.h — the kernel/user ABI of the same-node kernel splice (bpf/splice.c).
 * Mirrored by agent/proxy/splice_abi.py; tests/unit/test_proxy_splice.py compiles this header with
 * gcc and compares every size and constant with the mirror.
 *
 * Kept apart from include/tcpmesh_abi.h and tcpstats/ on purpose: each owner's pin names hash its
 * own headers, so a change here reloads neither the capture nor the TCP statistics.
 */
#ifndef TCPMESH_SPLICE_ABI_H
#define TCPMESH_SPLICE_ABI_H

#include <linux/types.h>

#define TCPMESH_SPLICE_ABI_VERSION 1

/* How many sockets can be spliced at once (two per same-node connection). */
#ifndef TCPMESH_SPLICE_SOCKETS
#define TCPMESH_SPLICE_SOCKETS 65536
#endif

/* Reason counters (tcpmesh_splice_counters); codes are never reused. */
enum tcpmesh_splice_reason {
	TCPMESH_SPR_REDIRECTED = 0, /* an skb sent on to the peer socket's egress */
	TCPMESH_SPR_NO_PEER = 1,    /* no peer under the socket's cookie: left in the socket's own queue */
	TCPMESH_SPR_EMPTY = 2,      /* an skb without payload (a FIN alone): dropped, the FIN is in the socket's state */
	TCPMESH_SPR_MAX = 3,
	TCPMESH_SPR_SLOTS = 8,
};

#endif
