/* SPDX-License-Identifier: Apache-2.0 */
/*
 * maps.h — every map of the ebpf-connect capture mode, in one place.
 * Each entry says who writes it, who reads it, and what bounds it. Names carry the tcpmesh_
 * prefix so `bpftool map show` makes a crashed run's leftovers recognisable (the kernel keeps
 * the first 15 characters of a map name).
 */
#ifndef TCPMESH_LIB_MAPS_H
#define TCPMESH_LIB_MAPS_H

#include "tcpmesh_abi.h"

#ifndef TCPMESH_MAX_CONNS
#define TCPMESH_MAX_CONNS 65536
#endif
#ifndef TCPMESH_MAX_PODS
#define TCPMESH_MAX_PODS 4096
#endif
#ifndef TCPMESH_MAX_CIDRS
#define TCPMESH_MAX_CIDRS 1024
#endif
#ifndef TCPMESH_MAX_MESH_DSTS
#define TCPMESH_MAX_MESH_DSTS 65536
#endif
#define TCPMESH_EGRESS_RING_BYTES (256 * 1024) /* a power of two pages: ~4,600 events of 56 (+8) bytes */

/*
 * Pinning (docs/capture.md, "Pinned objects"): the loader passes -DTCPMESH_MAPS_DIR="<bpffs dir>/
 * maps-v<ABI>-<hash>". bcc then opens each map pinned there, or creates and pins it, so a new
 * program set loaded by a restarted agent shares the maps (and their state) of the one it replaces.
 * bcc reuses a pinned map WITHOUT comparing its definition: the directory name carries a hash of
 * this header, tcpmesh_abi.h and TCPMESH_MAX_CONNS, so any change of a definition gets new maps.
 * Without TCPMESH_MAPS_DIR the maps are private to the loading process (unpinned).
 */
#ifdef TCPMESH_MAPS_DIR
#define TCPMESH_MAP(type, key, leaf, name, entries, flags) \
	BPF_TABLE_PINNED7(type, key, leaf, name, entries, TCPMESH_MAPS_DIR "/" #name, flags)
#else
#define TCPMESH_MAP(type, key, leaf, name, entries, flags) BPF_F_TABLE(type, key, leaf, name, entries, flags)
#endif
#define TCPMESH_NO_PREALLOC 1 /* BPF_F_NO_PREALLOC, required by LPM tries */

#ifndef TCPMESH_SOCK_SLOTS
#define TCPMESH_SOCK_SLOTS 65536 /* a power of two: a slot is cookie & (TCPMESH_SOCK_SLOTS - 1) */
#endif

/*
 * tcpmesh_sock_slots: array of struct tcpmesh_sock_slot, the per-socket record of captured client
 * sockets, slot = cookie & (TCPMESH_SOCK_SLOTS - 1): no hashing, no lock, no allocation, and the
 * sockets a CPU creates one after another get neighbouring cookies, so neighbouring slots.
 *   writer:   cgroup/connect4 and connect6 on a pod cgroup, when they capture a connect(): the
 *             socket takes its slot (compare-and-swap 0 -> cookie) or already owns it; a slot owned
 *             by another live socket sends the record to tcpmesh_cookie_origin (slot_taken).
 *   readers:  as tcpmesh_cookie_origin; a reader trusts a slot only if ``owner`` is its cookie.
 *   eviction: the owner gives it back at TCP_CLOSE (pod sockops, state callback). A socket whose
 *             connect() failed before its SYN keeps it until it connects again and closes. (A
 *             socket that moves from the LRU to a freed slot on a later connect() leaves its LRU
 *             entry to the LRU: readers look at the slot first.)
 *             Used only where connect4/6 can turn the state callback on (TCPMESH_CONNECT_CB_FLAGS,
 *             Linux >= 6.12): without it a refused handshake would never give its slot back.
 */
TCPMESH_MAP("array", int, struct tcpmesh_sock_slot, tcpmesh_sock_slots, TCPMESH_SOCK_SLOTS, 0);

/*
 * tcpmesh_cookie_origin: socket cookie -> struct tcpmesh_origin, for captured client sockets whose
 * slot in tcpmesh_sock_slots is taken (or every captured socket before Linux 6.12).
 *   writer:   cgroup/connect4 and connect6 on a pod cgroup, when they capture a connect() (an
 *             update into a preallocated map: no allocation on the connect path).
 *   readers:  pod sockops (at TCP_CONNECT_CB: turn on the state callback for this socket; at
 *             ACTIVE_ESTABLISHED: publish the record under the connection's peer key),
 *             getpeername4/6 (the original peer). Both check the socket's actual peer first: a
 *             record describes the socket's last captured connect(), and counts only while the
 *             socket is connected to the redirect address.
 *   eviction: deleted by pod sockops when the socket reaches TCP_CLOSE (STATE_CB: a failed or
 *             refused handshake, a close, a reset). LRU only for what that cannot see: a connect()
 *             that failed before its SYN (no sockops ran). Pinned, so a connection captured by one
 *             program set and established under the next (a restart or upgrade) keeps its record.
 * Replaces ABI 3's socket storage: creating storage on a socket allocated on every captured
 * connect (docs/capture.md, "What the capture costs").
 */
TCPMESH_MAP("lru_hash", __u64, struct tcpmesh_origin, tcpmesh_cookie_origin, TCPMESH_MAX_CONNS, 0);

#ifndef TCPMESH_HANDOVER_SLOTS
#define TCPMESH_HANDOVER_SLOTS 16384 /* a power of two; holds connections the proxy has not asked about yet */
#endif
#define TCPMESH_HANDOVER_TTL_NS (30ull * 1000000000ull) /* READY longer than this: its proxy is gone */

/*
 * tcpmesh_handover_slots: array of struct tcpmesh_handover_slot, the hand-over of a captured
 * connection's record from the client socket to the proxy's accepted socket, slot =
 * (client_seq ^ server_seq) & (TCPMESH_HANDOVER_SLOTS - 1): both ISNs are random, so slots are
 * spread evenly, found without hashing or locks.
 *   writer:   pod sockops at ACTIVE_ESTABLISHED (FREE -> WRITING -> READY); a slot in use sends
 *             the record to tcpmesh_peer_origin (handover_slot_taken).
 *   reader:   cgroup/getsockopt on the proxy's accepted socket: READY with its own key ->
 *             ANSWERING -> FREE with the answer (one answer per connection).
 *   eviction: given back with the answer. A READY slot older than TCPMESH_HANDOVER_TTL_NS (the
 *             proxy that should have asked is gone, e.g. killed with connections in its accept
 *             queue) is reused by the next writer that needs it (handover_reclaimed).
 */
TCPMESH_MAP("array", int, struct tcpmesh_handover_slot, tcpmesh_handover_slots, TCPMESH_HANDOVER_SLOTS, 0);

/*
 * tcpmesh_peer_origin: struct tcpmesh_peer_key (client ip, port and both handshake sequence
 * numbers) -> struct tcpmesh_origin: hands a record from the client socket to the proxy.
 *   writer:   pod sockops at ACTIVE_ESTABLISHED (the client got the SYN-ACK), for a captured
 *             socket connected to the redirect address, when its tcpmesh_handover_slots slot is
 *             in use (or before Linux 6.12).
 *   reader:   cgroup/getsockopt on the proxy's accepted socket, which rebuilds the same key from
 *             that socket and deletes the entry with its answer (one answer per connection).
 *   eviction: deleted when answered; LRU only for connections the proxy never asked about (a
 *             handshake that did not complete on the proxy side, a proxy that died first). Such
 *             a leftover cannot match any other connection: its key has both ISNs.
 */
TCPMESH_MAP("lru_hash", struct tcpmesh_peer_key, struct tcpmesh_origin, tcpmesh_peer_origin,
	    TCPMESH_MAX_CONNS, 0);

/*
 * tcpmesh_capture_cidrs: LPM trie, destination prefix -> struct tcpmesh_cidr_value.
 *   writer:   user space only (agent/capture/connect_mode.py, from the config; default 0.0.0.0/0).
 *   reader:   cgroup/connect4 and connect6 (longest prefix decides capture or bypass; no match =
 *             not captured).
 *   eviction: none; user space owns the content (agent/capture/cidrs.py refuses more than fit).
 */
TCPMESH_MAP("lpm_trie", struct tcpmesh_cidr_key, struct tcpmesh_cidr_value, tcpmesh_capture_cidrs,
	    TCPMESH_MAX_CIDRS, TCPMESH_NO_PREALLOC);

/*
 * tcpmesh_mesh_dsts: LPM trie, struct tcpmesh_dst_key -> struct tcpmesh_dst_value: the destinations
 * in the mesh (the registry's workload addresses; later Service addresses and ports).
 *   writer:   user space only (ConnectCapture.set_mesh_destinations, from every registry snapshot,
 *             before the workloads of that snapshot are attached; new entries in before stale out).
 *   reader:   cgroup/connect4 and connect6 on pod cgroups: a TCP destination inside the capture
 *             CIDRs is captured only when it matches an entry of a kind other than OUTSIDE; every
 *             other connect leaves from the pod untouched (or is refused: tcpmesh_settings).
 *   eviction: none; user space owns the content (it refuses more than fit).
 */
TCPMESH_MAP("lpm_trie", struct tcpmesh_dst_key, struct tcpmesh_dst_value, tcpmesh_mesh_dsts,
	    TCPMESH_MAX_MESH_DSTS, TCPMESH_NO_PREALLOC);

/*
 * tcpmesh_settings: array, one struct tcpmesh_settings at key 0: node-wide switches.
 *   writer:   user space (ConnectCapture.load(), from the config, before anything is attached).
 *   reader:   cgroup/connect4 and connect6 for a destination outside the mesh. A missing entry
 *             cannot happen (an array); a zeroed one means passthrough ALLOW.
 */
TCPMESH_MAP("array", int, struct tcpmesh_settings, tcpmesh_settings, 1, 0);

/*
 * tcpmesh_egress: ring buffer of struct tcpmesh_egress_event, one per TCP connect to a destination
 * outside the mesh (allowed or denied).
 *   writer:   cgroup/connect4 and connect6 (bpf_ringbuf_reserve/submit; full: the connect is
 *             decided anyway and counted as egress_event_lost).
 *   reader:   the agent (agent/capture/egress.py, libbpf's ring_buffer over the pinned map),
 *             feeding tcpmesh_egress_outside_mesh_total and the access log.
 * Declared by hand: bcc's BPF_RINGBUF_OUTPUT cannot be pinned, but its frontend reads the pin
 * path after the ':' of any "maps/<type>" section, as BPF_TABLE_PINNED does.
 */
struct tcpmesh_egress_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
#ifdef TCPMESH_MAPS_DIR
__attribute__((section("maps/ringbuf:" TCPMESH_MAPS_DIR "/tcpmesh_egress")))
#else
__attribute__((section("maps/ringbuf")))
#endif
struct tcpmesh_egress_table_t tcpmesh_egress = { .max_entries = TCPMESH_EGRESS_RING_BYTES };

/*
 * tcpmesh_counters: per-CPU array indexed by enum tcpmesh_reason.
 *   writers:  every hook (tcpmesh_count()).
 *   reader:   user space, summed over CPUs at scrape time (ConnectCapture.counters()).
 *   eviction: none; TCPMESH_R_SLOTS entries, more than there are reasons, so appending a reason
 *             code does not change the map and a restarted agent keeps counting where it was.
 */
TCPMESH_MAP("percpu_array", int, __u64, tcpmesh_counters, TCPMESH_R_SLOTS, 0);

/*
 * tcpmesh_proxy_conns: struct tcpmesh_flow4 -> __u32 (1), the connections the inbound proxy opened.
 *   writer:   sockops on the proxy's cgroup at TCP_CONNECT_CB (just before its SYN leaves); the
 *             same program deletes it at the socket's TCP_CLOSE (state callback).
 *   reader:   cgroup_skb/ingress on pod cgroups: a SYN whose 4-tuple is here comes from the mesh.
 *   eviction: deleted at close, so the map holds live connections only; LRU as a backstop.
 */
TCPMESH_MAP("lru_hash", struct tcpmesh_flow4, __u32, tcpmesh_proxy_conns, TCPMESH_MAX_CONNS, 0);

/* tcpmesh_pxconn6: the same for the inbound proxy's IPv6 connections (struct tcpmesh_flow6);
 * read by tcpmesh_inb6. */
TCPMESH_MAP("lru_hash", struct tcpmesh_flow6, __u32, tcpmesh_pxconn6, TCPMESH_MAX_CONNS, 0);

/*
 * tcpmesh_inbound_mode: pod cgroup id -> TCPMESH_INBOUND_STRICT | TCPMESH_INBOUND_PERMISSIVE.
 *   writer:   user space (the agent, from PeerAuthentication policies; docs/policy.md).
 *   reader:   cgroup_skb/ingress on pod cgroups, for the socket's cgroup and every ancestor of it
 *             (a container cgroup below the pod: tcpmesh_sk_workload). No entry: PERMISSIVE.
 *   eviction: user space deletes the entry when the pod leaves the node.
 */
TCPMESH_MAP("hash", __u64, __u32, tcpmesh_inbound_mode, TCPMESH_MAX_PODS, 0);

/*
 * tcpmesh_plaintext: pod cgroup id (the registered ancestor, else the socket's own cgroup id)
 *   -> struct tcpmesh_plaintext, per CPU.
 *   writer:   cgroup_skb/ingress on pod cgroups, for every SYN from outside the mesh.
 *   reader:   user space, summed over CPUs at scrape time (tcpmesh_plaintext_*_total).
 *   eviction: user space deletes the entry when the pod leaves the node.
 */
TCPMESH_MAP("percpu_hash", __u64, struct tcpmesh_plaintext, tcpmesh_plaintext, TCPMESH_MAX_PODS, 0);

/*
 * tcpmesh_seen: per-CPU array, one struct tcpmesh_seen_ring: the cookies of the last sockets whose
 * connect() a pod hook of this set decided.
 *   writer:   cgroup/connect4 and connect6 on a pod cgroup, on every connect() they see (captured
 *             or not): "a tcpmesh pod hook decided this connect".
 *   reader:   the node guard (cgroup/connect4/6 on the pods cgroup, an ancestor of every pod
 *             cgroup). Programs of a descendant cgroup run before those of its ancestors, and the
 *             kernel runs a cgroup's whole program array with migration disabled, so the guard
 *             runs after the pod hooks on the same CPU. It looks for the socket's cookie, clears
 *             the slot (consumes it) and refuses a TCP connect whose cookie is not there: the pod
 *             is under the pods cgroup but not captured (yet). Another task preempting the walk
 *             could only push a cookie out of the ring after more than TCPMESH_SEEN_SLOTS connects
 *             of its own: a refusal, never a pass.
 *   eviction: slots are overwritten in turn. Not pinned: it links the programs of one set only
 *             (during a takeover two guards run, each consuming its own set's mark).
 * Replaces a per-socket storage token: creating socket storage on every pod connect cost more
 * than the rest of connect4 (docs/capture.md, "What the capture costs").
 */
#define TCPMESH_SEEN_SLOTS 8 /* a power of two */
struct tcpmesh_seen_ring {
	__u64 cookie[TCPMESH_SEEN_SLOTS]; /* socket cookies; 0 = free */
	__u32 next;                       /* next slot to write, modulo TCPMESH_SEEN_SLOTS */
	__u32 pad;
};
BPF_PERCPU_ARRAY(tcpmesh_seen, struct tcpmesh_seen_ring, 1);

#endif /* TCPMESH_LIB_MAPS_H */
