/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tcpstats/rtt.h — the RTT histogram's bucket arithmetic (pure: no maps, no context), shared by
 * bpf/tcp_stats.c and the host test that checks it against agent/telemetry/tcpstats_abi.rtt_bucket.
 */
#ifndef TCPMESH_TCPSTATS_RTT_H
#define TCPMESH_TCPSTATS_RTT_H

#include "tcpstats/abi.h"

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

/* 1-based index of the highest set bit (0 for 0), without loops. */
static __always_inline __u32 tcpmesh_fls32(__u32 x)
{
	__u32 r = 0;

	if (x >> 16) { x >>= 16; r += 16; }
	if (x >> 8) { x >>= 8; r += 8; }
	if (x >> 4) { x >>= 4; r += 4; }
	if (x >> 2) { x >>= 2; r += 2; }
	if (x >> 1) { x >>= 1; r += 1; }
	return r + (x ? 1 : 0);
}

/* The histogram bucket of an RTT in microseconds (see tcpstats/abi.h). */
static __always_inline __u32 tcpmesh_rtt_bucket(__u32 rtt_us)
{
	__u32 bits = tcpmesh_fls32(rtt_us ? rtt_us - 1 : 0);

	if (bits <= TCPMESH_RTT_FIRST_SHIFT)
		return 0;
	bits -= TCPMESH_RTT_FIRST_SHIFT;
	return bits < TCPMESH_RTT_BOUNDED ? bits : TCPMESH_RTT_BOUNDED;
}

#endif
