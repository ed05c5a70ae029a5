/* SPDX-License-Identifier: Apache-2.0 */
/*
 * splice/maps.h — the maps of the same-node kernel splice (bpf/splice.c), each with its writer,
 * reader and bound. Names keep the tcpmesh_ prefix and stay distinct in their first 15 characters
 * (tcpmesh_splice_, tcpmesh_splcnt).
 *
 * Pinned like every owner's maps: the loader passes -DTCPMESH_MAPS_DIR="<bpffs dir>/splice-maps-
 * <hash of splice/*.h and the size>", and bcc opens or creates each map there.
 */
#ifndef TCPMESH_SPLICE_MAPS_H
#define TCPMESH_SPLICE_MAPS_H

#include "splice/abi.h"

#ifdef TCPMESH_MAPS_DIR
#define TCPMESH_SPLICE_PIN(name) ":" TCPMESH_MAPS_DIR "/" #name
#else
#define TCPMESH_SPLICE_PIN(name) ""
#endif

/*
 * tcpmesh_splice_peers: BPF_MAP_TYPE_SOCKHASH, socket cookie -> the *other* socket of its pair.
 *   Keyed crosswise: the workload socket is stored under the client socket's cookie and the client
 *   socket under the workload socket's cookie, so the verdict program looks up the cookie of the
 *   socket the bytes arrived on and finds where they go — one map, no second lookup.
 *   writer:   user space (agent/proxy/splice.py), once per same-node connection, after authorization
 *             and the workload's connect, before any byte is read in user space.
 *   reader:   the sk_skb verdict program (attached to this map), for every skb of a spliced socket.
 *   eviction: the kernel removes a socket from the map when it closes (the agent closes both at the
 *             end of the connection); user space deletes both keys first. Bounded by
 *             TCPMESH_SPLICE_SOCKETS (an insert beyond it fails: the connection stays in user space).
 * The same shape as bcc's BPF_SOCKHASH, with a pin path in the section (bcc has no pinned form).
 */
struct tcpmesh_splice_peers_table_t {
	__u64 key;
	int leaf;
	int (*update)(__u64 *, int *);
	int (*delete)(__u64 *);
	int (*sock_hash_update)(void *, void *, __u64);
	int (*msg_redirect_hash)(void *, void *, __u64);
	int (*sk_redirect_hash)(void *, void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/sockhash" TCPMESH_SPLICE_PIN(tcpmesh_splice_peers))))
struct tcpmesh_splice_peers_table_t tcpmesh_splice_peers = { .max_entries = TCPMESH_SPLICE_SOCKETS };
BPF_ANNOTATE_KV_PAIR(tcpmesh_splice_peers, __u64, int);

#ifdef TCPMESH_MAPS_DIR
#define TCPMESH_SPLICE_MAP(type, key, leaf, name, entries) \
	BPF_TABLE_PINNED(type, key, leaf, name, entries, TCPMESH_MAPS_DIR "/" #name)
#else
#define TCPMESH_SPLICE_MAP(type, key, leaf, name, entries) BPF_TABLE(type, key, leaf, name, entries)
#endif

/*
 * tcpmesh_splcnt: per-CPU array indexed by enum tcpmesh_splice_reason.
 *   writer: the verdict program.  reader: user space at scrape time and in tests.  eviction: none.
 */
TCPMESH_SPLICE_MAP("percpu_array", int, __u64, tcpmesh_splcnt, TCPMESH_SPR_SLOTS);

#endif
