/* SPDX-License-Identifier: Apache-2.0 */
/*
 * capture_connect.c — the ebpf-connect capture mode (docs/capture.md).
 *
 *   cgroup/connect4     (pod cgroups)   captured IPv4 TCP connect() -> REDIR_IP:REDIR_PORT; the
 *                                       original destination + pid/uid/cgroup/comm recorded in the
 *                                       socket's slot (tcpmesh_sock_slots, by cookie); a connect to
 *                                       the node's admin port (-DTCPMESH_ADMIN_PORT) is refused
 *   cgroup/connect6     (pod cgroups)   the same for v4-mapped destinations of dual-stack AF_INET6
 *                                       sockets (JVM, Go, ...) and for native IPv6 destinations in
 *                                       the mesh: both go to ::ffff:REDIR_IP:REDIR_PORT
 *   sockops             (pod cgroups)   at ACTIVE_ESTABLISHED the record is published with the
 *                                       connection's peer key (client ip/port + both ISNs) in its
 *                                       hand-over slot; at TCP_CLOSE of a captured socket the
 *                                       socket's slot is given back
 *   cgroup/getsockopt   (proxy cgroup)  answers SOL_IP/SO_ORIGINAL_DST or SOL_IP/TCPMESH_SO_ORIGIN
 *                                       once, from the record with the accepted socket's key
 *   cgroup/getpeername4/6 (pod cgroups) the app sees the destination it asked for
 *   sockops             (proxy cgroup)  tcpmesh_pxops: records the inbound proxy's connections to pods
 *   cgroup_skb/ingress  (pod cgroups)   tcpmesh_inb4 / tcpmesh_inb6: a SYN into the pod (IPv4 / IPv6)
 *                                       that is not from the inbound proxy is dropped (STRICT pod) or
 *                                       let in (PERMISSIVE), counted
 *   cgroup/connect4/6   (pods cgroup,   the node guard: a TCP connect from a pod cgroup below it
 *    tcpmesh_guard4/6    the ancestor    that no pod hook handled (not captured yet) is refused,
 *                        of every pod)   except to loopback and the redirect address, and (with
 *                                        -DTCPMESH_GUARD_NETNS_COOKIE) from the agent's own netns
 *
 * Build: agent/bpf/loader.py, in a short-lived process: BPF(src_file=..., cflags=[
 *   "-I<repo>/bpf", "-I<repo>/bpf/include", "-DREDIR_IP=<host-order u32>u", "-DREDIR_PORT=<port>",
 *   "-DTCPMESH_MAX_CONNS=<n>", "-DTCPMESH_MAPS_DIR=\"<bpffs dir>/maps-...\"", optionally
 *   "-DTCPMESH_GUARD_NETNS_COOKIE=<u64>ull", "-DTCPMESH_ADMIN_IP=<host-order u32>u"
 *   "-DTCPMESH_ADMIN_PORT=<port>"]), then every program
 *   is pinned in bpffs and the agent attaches the pinned programs without bcc.
 *
 * Layout: hooks at the bottom are thin (guard, one helper, return). Helpers that only read a
 * context or fill a struct live in lib/; helpers that touch a map live in this file, because bcc
 * rewrites map operations (map.lookup() and friends) only in the main source file — in an
 * included header they compile to an indirect call the verifier rejects ("unknown opcode 8d").
 * Return values: sock_addr/sockopt hooks return 1 to let the syscall proceed and 0 to fail it
 * with EPERM; the kernel ignores sockops' return value for the ESTABLISHED callbacks.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/errno.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include "tcpmesh_abi.h"
#include "lib/maps.h"
#include "lib/capture_policy.h"
#include "lib/origin.h"
#include "lib/sockopt.h"

#define TCPMESH_ALLOW 1
#define TCPMESH_DENY 0
#define TCPMESH_SOL_TCP 6
#define TCPMESH_TCP_BPF_SOCK_OPS_CB_FLAGS 1008 /* uapi/linux/bpf.h since 6.12 (not in the stub's 6.1 UAPI) */
/* How deep below the cgroup v2 root a workload's cgroup may sit (the kubelet's are at 2-4, the lab's
 * at 4, nested runtimes deeper); a socket deeper than this below a STRICT pod is still found, as
 * long as the pod cgroup itself is within the bound. */
#define TCPMESH_MAX_CGROUP_LEVEL 16
#ifndef TCPMESH_CONNECT_CB_FLAGS
#define TCPMESH_CONNECT_CB_FLAGS 0 /* 1: connect4/6 can set sockops flags (Linux >= 6.12; -D by the loader) */
#endif

/* ---- helpers that touch maps ----------------------------------------------------------------- */

static __always_inline void tcpmesh_count(int reason)
{
	__u64 *value = tcpmesh_counters.lookup(&reason);

	if (value)
		*value += 1; /* this CPU's slot: no other writer, no atomics needed */
}

/* Pod hooks: leave the mark the guard looks for (this socket's cookie in this CPU's ring, see
 * tcpmesh_seen in maps.h). A CPU without its ring slot leaves none, and the guard refuses the
 * connect: fail-closed. */
static __always_inline void tcpmesh_mark_seen(__u64 cookie)
{
	int zero = 0;
	struct tcpmesh_seen_ring *ring = tcpmesh_seen.lookup(&zero);

	if (!ring) {
		tcpmesh_count(TCPMESH_R_MAP_UPDATE_FAILED);
		return;
	}
	ring->cookie[ring->next & (TCPMESH_SEEN_SLOTS - 1)] = cookie;
	ring->next += 1;
}

/* Guard: did a pod hook handle this connect? Consumes the mark, so a socket whose pod hooks are
 * detached before a later connect() (a TCP socket may retry after a failure) needs a new one. */
static __always_inline int tcpmesh_take_seen(struct bpf_sock_addr *ctx)
{
	int zero = 0;
	struct tcpmesh_seen_ring *ring = tcpmesh_seen.lookup(&zero);
	__u64 cookie;

	if (!ring)
		return 0;
	cookie = bpf_get_socket_cookie(ctx);
#pragma unroll
	for (int i = 0; i < TCPMESH_SEEN_SLOTS; i++) {
		if (ring->cookie[i] == cookie) {
			ring->cookie[i] = 0;
			return 1;
		}
	}
	return 0;
}

/* The node guard's decision for a connect that no pod hook marked. With
 * -DTCPMESH_GUARD_NETNS_COOKIE=<the agent's netns cookie> (capture.guard_exempt_host_network, the
 * DaemonSet), a socket of the agent's own network namespace is not a pod's: hostNetwork pods — the
 * agent among them, kube-proxy, the CNI — sit below kubepods too, are never meshed (they share the
 * node's address) and must keep working while the guard refuses every pod it has not captured. */
static __always_inline int tcpmesh_guard_verdict(struct bpf_sock_addr *ctx, int exempt)
{
	if (!tcpmesh_is_tcp(ctx->type, ctx->protocol))
		return TCPMESH_ALLOW; /* the mesh is TCP; UDP (DNS) is never captured either */
#ifdef TCPMESH_GUARD_NETNS_COOKIE
	if (bpf_get_netns_cookie(ctx) == (__u64)TCPMESH_GUARD_NETNS_COOKIE) {
		tcpmesh_count(TCPMESH_R_GUARD_HOST_NETWORK);
		return TCPMESH_ALLOW;
	}
#endif
	if (exempt) {
		tcpmesh_count(TCPMESH_R_GUARD_EXEMPT);
		return TCPMESH_ALLOW;
	}
	tcpmesh_count(TCPMESH_R_GUARD_DENIED);
	return TCPMESH_DENY;
}

static __always_inline int tcpmesh_cidr_verdict(__u32 dst)
{
	struct tcpmesh_cidr_key key = {};
	struct tcpmesh_cidr_value *cidr;

	key.prefixlen = 32;
	key.ip4 = dst;
	cidr = tcpmesh_capture_cidrs.lookup(&key);
	if (!cidr || cidr->action != TCPMESH_CIDR_CAPTURE)
		return TCPMESH_R_NOT_CAPTURED;
	return TCPMESH_R_CAPTURED;
}

/* Is the destination (``addr``: network order, IPv4 in addr[0]; ``port_be``: network order) in the
 * mesh? One LPM lookup with the full key: an address+port entry beats an address entry beats a
 * prefix. CAPTURED, or OUTSIDE_MESH_ALLOWED for "decide as a destination outside the mesh". */
static __always_inline int tcpmesh_mesh_verdict(__u8 family, const __u32 *addr, __u16 port_be)
{
	struct tcpmesh_dst_key key = {};
	struct tcpmesh_dst_value *dst;

	key.prefixlen = TCPMESH_DST_KEY_BITS;
	key.family = family;
	key.addr[0] = addr[0];
	key.addr[1] = addr[1];
	key.addr[2] = addr[2];
	key.addr[3] = addr[3];
	key.port = port_be;
	dst = tcpmesh_mesh_dsts.lookup(&key);
	if (!dst || dst->kind == TCPMESH_DST_OUTSIDE)
		return TCPMESH_R_OUTSIDE_MESH_ALLOWED;
	return TCPMESH_R_CAPTURED;
}

/* policy.outbound_passthrough, as the agent wrote it into tcpmesh_settings. */
static __always_inline int tcpmesh_passthrough_denied(void)
{
	int zero = 0;
	struct tcpmesh_settings *settings = tcpmesh_settings.lookup(&zero);

	return settings && (settings->flags & TCPMESH_SETTING_PASSTHROUGH_DENY);
}

/* A TCP connect to a destination outside the mesh: never redirected, so it leaves from the pod
 * with the pod's own address (the agent never dials it). Refused here when passthrough is DENY.
 * Either way one event goes to the agent's ring buffer (telemetry only) and a reason is counted. */
static __always_inline int tcpmesh_outside_mesh(struct bpf_sock_addr *ctx, __u8 family, const __u32 *addr)
{
	int denied = tcpmesh_passthrough_denied();
	struct tcpmesh_egress_event *event = tcpmesh_egress.ringbuf_reserve(sizeof(struct tcpmesh_egress_event));

	if (event) {
		tcpmesh_fill_egress_event(ctx, family, addr, denied, event);
		tcpmesh_egress.ringbuf_submit(event, 0);
	} else {
		tcpmesh_count(TCPMESH_R_EGRESS_EVENT_LOST);
	}
	if (denied) {
		tcpmesh_count(TCPMESH_R_OUTSIDE_MESH_DENIED);
		return TCPMESH_DENY;
	}
	tcpmesh_count(TCPMESH_R_OUTSIDE_MESH_ALLOWED);
	return TCPMESH_ALLOW;
}

/* connect4/6 on capture: the socket gets the sockops state callback, so pod sockops deletes its
 * record when it closes (TCP_CLOSE: a refused or failed handshake too), and that flag is how pod
 * sockops tells a captured socket at ESTABLISHED without a map lookup. Only captured sockets pay
 * for the extra callbacks. bpf_setsockopt(TCP_BPF_SOCK_OPS_CB_FLAGS) from a connect hook needs
 * Linux 6.12: the loader defines TCPMESH_CONNECT_CB_FLAGS there (agent/capture/connect_mode.py),
 * and a failure then refuses the connect (fail-closed, counted). Without it the calls are still
 * tried, and sockops looks the record up and turns the flag on at ACTIVE_ESTABLISHED instead (a
 * handshake that fails then leaves its record to the LRU). */
static __always_inline int tcpmesh_watch_state(struct bpf_sock_addr *ctx)
{
	int flags = 0;

	if (bpf_getsockopt(ctx, TCPMESH_SOL_TCP, TCPMESH_TCP_BPF_SOCK_OPS_CB_FLAGS, &flags, sizeof(flags)) != 0)
		return -EINVAL;
	flags |= BPF_SOCK_OPS_STATE_CB_FLAG;
	return bpf_setsockopt(ctx, TCPMESH_SOL_TCP, TCPMESH_TCP_BPF_SOCK_OPS_CB_FLAGS, &flags, sizeof(flags));
}

/* The slot of the socket with ``cookie`` in tcpmesh_sock_slots (NULL before Linux 6.12: no
 * close callback from connect4/6 to give it back, so the LRU alone serves). */
static __always_inline struct tcpmesh_sock_slot *tcpmesh_sock_slot_of(__u64 cookie)
{
	int index = cookie & (TCPMESH_SOCK_SLOTS - 1);

	if (!TCPMESH_CONNECT_CB_FLAGS)
		return 0;
	return tcpmesh_sock_slots.lookup(&index);
}

/* The socket's slot in tcpmesh_sock_slots if it owns it, else NULL. Only the owner writes a slot,
 * and the owner's hooks run under its socket's lock: what it reads there is its own record. */
static __always_inline struct tcpmesh_sock_slot *tcpmesh_own_slot(__u64 cookie)
{
	struct tcpmesh_sock_slot *slot = tcpmesh_sock_slot_of(cookie);

	if (!slot || slot->owner != cookie)
		return 0;
	return slot;
}

/* The socket's slot, taken now if it is free (compare-and-swap 0 -> cookie: two sockets whose
 * cookies share a slot cannot both win), or NULL: another live socket owns it. */
static __always_inline struct tcpmesh_sock_slot *tcpmesh_take_slot(__u64 cookie)
{
	struct tcpmesh_sock_slot *slot = tcpmesh_sock_slot_of(cookie);

	if (!slot)
		return 0;
	if (slot->owner != cookie && __sync_val_compare_and_swap(&slot->owner, 0, cookie) != 0) {
		tcpmesh_count(TCPMESH_R_SLOT_TAKEN);
		return 0;
	}
	return slot;
}

/* Give the socket's record up: its slot back (the compare-and-swap orders it after every write of
 * the record), or its LRU entry. Returns 0 if there was one. */
static __always_inline int tcpmesh_forget(__u64 cookie)
{
	struct tcpmesh_sock_slot *slot = tcpmesh_own_slot(cookie);

	if (slot) {
		__sync_val_compare_and_swap(&slot->owner, cookie, 0);
		return 0;
	}
	return tcpmesh_cookie_origin.delete(&cookie);
}

/* The socket's record: its slot, or (slot taken, or before Linux 6.12) its tcpmesh_cookie_origin entry. */
static __always_inline struct tcpmesh_origin *tcpmesh_origin_of(__u64 cookie)
{
	struct tcpmesh_sock_slot *slot = tcpmesh_own_slot(cookie);

	if (slot)
		return &slot->origin;
	return tcpmesh_cookie_origin.lookup(&cookie);
}

/* connect4/6: the origin goes into the socket's slot (no hashing, no allocation), or under its
 * cookie into a preallocated LRU. A later captured connect() of the same socket overwrites it. */
static __always_inline int tcpmesh_record_origin(struct bpf_sock_addr *ctx, __u32 dst, const __u32 *dst6,
						 __u64 cookie)
{
	struct tcpmesh_sock_slot *slot = tcpmesh_take_slot(cookie);
	struct tcpmesh_origin origin = {};

	if (slot) {
		tcpmesh_fill_origin(ctx, dst, dst6, cookie, &slot->origin);
	} else {
		tcpmesh_fill_origin(ctx, dst, dst6, cookie, &origin);
		if (tcpmesh_cookie_origin.update(&cookie, &origin) != 0) {
			tcpmesh_count(TCPMESH_R_MAP_UPDATE_FAILED);
			return -ENOMEM;
		}
	}
	if (tcpmesh_watch_state(ctx) != 0 && TCPMESH_CONNECT_CB_FLAGS) {
		tcpmesh_forget(cookie);
		tcpmesh_count(TCPMESH_R_MAP_UPDATE_FAILED);
		return -EINVAL;
	}
	return 0;
}

/* The whole connect decision for an IPv4 destination ``dst`` (network order) whose fixed checks
 * gave ``verdict``; ``mapped`` = the socket is AF_INET6 and dst came from ::ffff:dst.
 * An uncaptured connect() leaves a record of an earlier captured connect() of the socket (a TCP
 * socket may connect again after a failure) in place: every reader checks that the socket is
 * connected to the redirect address, and a failed handshake deleted it at TCP_CLOSE anyway. A
 * connect to the redirect address itself must keep it: during a takeover another set's connect
 * hook runs first, and that is the destination it has just written. */
static __always_inline int tcpmesh_capture_connect(struct bpf_sock_addr *ctx, int verdict, __u32 dst, int mapped,
						   __u64 cookie)
{
	__u32 addr[4] = {dst, 0, 0, 0};
	__u32 no_ip6[4] = {};

#ifdef TCPMESH_ADMIN_PORT
	/* before the redirect-address and CIDR rules: in the DaemonSet the admin address is the
	 * redirect address (the host IP), and it need not be inside capture.cidrs */
	if ((verdict == TCPMESH_R_CAPTURED || verdict == TCPMESH_R_TO_REDIRECT) &&
	    tcpmesh_is_admin_port(dst, (__u16)ctx->user_port)) {
		tcpmesh_count(TCPMESH_R_ADMIN_PORT_DENIED);
		return TCPMESH_DENY;
	}
#endif
	if (verdict == TCPMESH_R_TO_REDIRECT && (__u16)ctx->user_port != bpf_htons(REDIR_PORT) &&
	    tcpmesh_mesh_verdict(TCPMESH_DST_INET, addr, (__u16)ctx->user_port) == TCPMESH_R_CAPTURED) {
		/* the redirect address is the node's own IP in the DaemonSet, where kube-proxy answers
		 * nodePorts: a mesh entry for this address and port (never the redirect port) is captured */
		verdict = TCPMESH_R_CAPTURED;
	} else {
		if (verdict == TCPMESH_R_CAPTURED)
			verdict = tcpmesh_cidr_verdict(dst);
		if (verdict == TCPMESH_R_CAPTURED)
			verdict = tcpmesh_mesh_verdict(TCPMESH_DST_INET, addr, (__u16)ctx->user_port);
	}
	if (verdict == TCPMESH_R_OUTSIDE_MESH_ALLOWED)
		return tcpmesh_outside_mesh(ctx, TCPMESH_DST_INET, addr);
	if (verdict != TCPMESH_R_CAPTURED) {
		tcpmesh_count(verdict);
		return TCPMESH_ALLOW;
	}
	if (tcpmesh_record_origin(ctx, dst, no_ip6, cookie) != 0)
		return TCPMESH_DENY;
	tcpmesh_redirect(ctx, mapped);
	tcpmesh_count(TCPMESH_R_CAPTURED);
	if (mapped)
		tcpmesh_count(TCPMESH_R_V4MAPPED);
	return TCPMESH_ALLOW;
}

/* connect6, a native IPv6 destination: the same decision as tcpmesh_capture_connect, by the mesh
 * map alone (the capture CIDRs are IPv4). Captured, it goes to ::ffff:REDIR_IP:REDIR_PORT like a
 * v4-mapped one (the proxy listens on IPv4; an IPV6_V6ONLY socket then fails at connect(): closed,
 * never plaintext) with the IPv6 destination in its record; with IPv6 meshing off (the node's
 * tcpmesh_settings) a destination in the mesh is refused. */
static __always_inline int tcpmesh_capture_connect6(struct bpf_sock_addr *ctx, __u64 cookie)
{
	__u32 addr[4] = {*(volatile __u32 *)&ctx->user_ip6[0], *(volatile __u32 *)&ctx->user_ip6[1],
			 *(volatile __u32 *)&ctx->user_ip6[2], *(volatile __u32 *)&ctx->user_ip6[3]};
	int zero = 0;
	struct tcpmesh_settings *settings;

	if (!tcpmesh_is_tcp(ctx->type, ctx->protocol)) {
		tcpmesh_count(TCPMESH_R_NOT_TCP);
		return TCPMESH_ALLOW;
	}
	if (tcpmesh_ip6_local(addr)) {
		tcpmesh_count(TCPMESH_R_LOOPBACK);
		return TCPMESH_ALLOW;
	}
	if (tcpmesh_mesh_verdict(TCPMESH_DST_INET6, addr, (__u16)ctx->user_port) != TCPMESH_R_CAPTURED)
		return tcpmesh_outside_mesh(ctx, TCPMESH_DST_INET6, addr);
	settings = tcpmesh_settings.lookup(&zero);
	if (!settings || (settings->flags & TCPMESH_SETTING_IPV6_OFF)) {
		tcpmesh_count(TCPMESH_R_IPV6_REFUSED);
		return TCPMESH_DENY;
	}
	if (tcpmesh_record_origin(ctx, 0, addr, cookie) != 0)
		return TCPMESH_DENY;
	tcpmesh_redirect(ctx, 1);
	tcpmesh_count(TCPMESH_R_CAPTURED);
	tcpmesh_count(TCPMESH_R_CAPTURED6);
	return TCPMESH_ALLOW;
}

/* The connection's hand-over slot in tcpmesh_handover_slots (NULL before Linux 6.12, as for the
 * socket slots: tcpmesh_peer_origin alone serves). */
static __always_inline struct tcpmesh_handover_slot *tcpmesh_handover_slot_of(const struct tcpmesh_peer_key *key)
{
	int index = (key->client_seq ^ key->server_seq) & (TCPMESH_HANDOVER_SLOTS - 1);

	if (!TCPMESH_CONNECT_CB_FLAGS)
		return 0;
	return tcpmesh_handover_slots.lookup(&index);
}

static __always_inline int tcpmesh_same_key(const struct tcpmesh_peer_key *a, const struct tcpmesh_peer_key *b)
{
	return a->ip4 == b->ip4 && a->port == b->port && a->client_seq == b->client_seq &&
	       a->server_seq == b->server_seq;
}

/* Pod sockops: the record into the connection's hand-over slot (FREE -> WRITING -> READY), or -1
 * when the slot is in use. The compare-and-swaps order every write of the slot before READY. */
static __always_inline int tcpmesh_publish_slot(const struct tcpmesh_peer_key *key, const struct tcpmesh_origin *origin)
{
	struct tcpmesh_handover_slot *slot = tcpmesh_handover_slot_of(key);
	__u64 now;

	if (!slot)
		return -1;
	now = bpf_ktime_get_ns();
	if (__sync_val_compare_and_swap(&slot->state, TCPMESH_HO_FREE, TCPMESH_HO_WRITING) != TCPMESH_HO_FREE) {
		if (slot->state != TCPMESH_HO_READY || now - slot->stamp < TCPMESH_HANDOVER_TTL_NS ||
		    __sync_val_compare_and_swap(&slot->state, TCPMESH_HO_READY, TCPMESH_HO_WRITING) != TCPMESH_HO_READY) {
			tcpmesh_count(TCPMESH_R_HANDOVER_SLOT_TAKEN);
			return -1;
		}
		tcpmesh_count(TCPMESH_R_HANDOVER_RECLAIMED);
	}
	slot->stamp = now;
	slot->key = *key;
	__builtin_memcpy(&slot->origin, origin, sizeof(slot->origin));
	__sync_val_compare_and_swap(&slot->state, TCPMESH_HO_WRITING, TCPMESH_HO_READY);
	return 0;
}

/* getsockopt: the slot holding this connection's record, now ANSWERING (ours alone), or NULL. The
 * key is checked again once the slot is ours: before, another connection's reader or writer may
 * have been changing it. */
static __always_inline struct tcpmesh_handover_slot *tcpmesh_claim_slot(const struct tcpmesh_peer_key *key)
{
	struct tcpmesh_handover_slot *slot = tcpmesh_handover_slot_of(key);

	if (!slot || slot->state != TCPMESH_HO_READY || !tcpmesh_same_key(&slot->key, key))
		return 0;
	if (__sync_val_compare_and_swap(&slot->state, TCPMESH_HO_READY, TCPMESH_HO_ANSWERING) != TCPMESH_HO_READY)
		return 0;
	if (!tcpmesh_same_key(&slot->key, key)) {
		__sync_val_compare_and_swap(&slot->state, TCPMESH_HO_ANSWERING, TCPMESH_HO_READY);
		return 0;
	}
	return slot;
}

/* Pod sockops at ACTIVE_ESTABLISHED: publish a captured socket's record for the proxy's side. */
static __always_inline int tcpmesh_publish_established(struct bpf_sock_ops *skops)
{
	struct tcpmesh_peer_key key = {};
	struct tcpmesh_origin *origin;
	__u64 cookie;

	/* No family check: a captured AF_INET6 socket (v4-mapped) has its IPv4 addresses in
	 * local_ip4/remote_ip4 too. A socket that is not connected to the redirect address was
	 * not captured this time, whatever record it has from an earlier connect(). */
	if (!tcpmesh_dials_redirect(skops))
		return 0;
	if (TCPMESH_CONNECT_CB_FLAGS && !(skops->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_STATE_CB_FLAG))
		return 0; /* connect4/6 flag every socket they capture: dialled the redirect address itself */
	cookie = bpf_get_socket_cookie(skops);
	origin = tcpmesh_origin_of(cookie);
	if (!origin)
		return 0; /* dialled the redirect address itself: no record, the proxy refuses it */
	if (!TCPMESH_CONNECT_CB_FLAGS && !(skops->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_STATE_CB_FLAG))
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	tcpmesh_peer_key_of_client(skops, &key);
	if (tcpmesh_publish_slot(&key, origin) == 0) {
		tcpmesh_count(TCPMESH_R_REKEYED);
		return 0;
	}
	if (tcpmesh_peer_origin.update(&key, origin) != 0) {
		tcpmesh_count(TCPMESH_R_MAP_UPDATE_FAILED);
		return -ENOMEM;
	}
	tcpmesh_count(TCPMESH_R_REKEYED);
	return 0;
}

/* Pod sockops STATE_CB (captured sockets only) at TCP_CLOSE: the socket's record goes with it. */
static __always_inline void tcpmesh_forget_closed(struct bpf_sock_ops *skops)
{
	if (tcpmesh_forget(bpf_get_socket_cookie(skops)) == 0)
		tcpmesh_count(TCPMESH_R_ORIGIN_CLOSED);
}

/* getsockopt on the proxy's accepted socket: the record of exactly this connection (the key holds
 * both handshake sequence numbers), answered once: the entry is deleted with the answer, so it can
 * neither answer for another connection nor stay behind. A short buffer consumes nothing. */
static __always_inline int tcpmesh_answered(int reason)
{
	return reason != TCPMESH_R_OPTLEN_SHORT && reason != TCPMESH_R_FAMILY_MISMATCH;
}

static __always_inline void tcpmesh_answer_sockopt(struct bpf_sockopt *ctx)
{
	struct tcpmesh_peer_key key = {};
	struct tcpmesh_handover_slot *slot;
	struct tcpmesh_origin *origin;
	int reason;

	if (tcpmesh_peer_key_of_accepted(ctx->sk, &key) != 0) {
		tcpmesh_count(TCPMESH_R_ORIGIN_MISSING);
		return;
	}
	slot = tcpmesh_claim_slot(&key);
	if (slot) {
		reason = tcpmesh_answer(ctx, &slot->origin);
		tcpmesh_count(reason);
		/* a short buffer or the wrong family consumes nothing: READY again for the next question */
		__sync_val_compare_and_swap(&slot->state, TCPMESH_HO_ANSWERING,
					    tcpmesh_answered(reason) ? TCPMESH_HO_FREE : TCPMESH_HO_READY);
		if (tcpmesh_answered(reason))
			tcpmesh_count(TCPMESH_R_ORIGIN_CLAIMED);
		return;
	}
	origin = tcpmesh_peer_origin.lookup(&key);
	if (!origin) {
		tcpmesh_count(TCPMESH_R_ORIGIN_MISSING);
		return;
	}
	reason = tcpmesh_answer(ctx, origin);
	tcpmesh_count(reason);
	if (tcpmesh_answered(reason) && tcpmesh_peer_origin.delete(&key) == 0)
		tcpmesh_count(TCPMESH_R_ORIGIN_CLAIMED);
}

static __always_inline void tcpmesh_show_original_peer(struct bpf_sock_addr *ctx, int mapped)
{
	struct tcpmesh_origin *origin;
	__u64 cookie;

	if (!tcpmesh_peer_is_redirect(ctx, mapped))
		return;
	cookie = bpf_get_socket_cookie(ctx);
	origin = tcpmesh_origin_of(cookie);
	if (!origin)
		return;
	if (mapped && tcpmesh_origin_is_ip6(origin))
		tcpmesh_set_peer6(ctx, origin->dst_ip6, origin->dst_port);
	else
		tcpmesh_set_peer(ctx, mapped, origin->dst_ip4, origin->dst_port);
	tcpmesh_count(TCPMESH_R_PEERNAME_REWRITTEN);
}

static __always_inline void tcpmesh_proxy_conn_key(struct bpf_sock_ops *skops, struct tcpmesh_flow4 *key)
{
	key->saddr = skops->local_ip4;
	key->daddr = skops->remote_ip4;
	key->sport = bpf_htons((__u16)skops->local_port); /* local_port is host order */
	key->dport = bpf_htons(tcpmesh_remote_port(skops));
}

/* TCP_CONNECT_CB: the record, and the state callback that removes it when the socket closes. */
static __always_inline void tcpmesh_record_proxy_conn(struct bpf_sock_ops *skops)
{
	struct tcpmesh_flow4 key = {};
	__u32 one = 1;

	tcpmesh_proxy_conn_key(skops, &key);
	if (tcpmesh_proxy_conns.update(&key, &one) != 0) {
		tcpmesh_count(TCPMESH_R_MAP_UPDATE_FAILED);
		return;
	}
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	tcpmesh_count(TCPMESH_R_PROXY_CONN);
}

/* STATE_CB at TCP_CLOSE: the connection is gone (its SYN long let in, or never answered), and so is
 * its record; the map holds only the inbound proxy's live connections. */
static __always_inline void tcpmesh_forget_proxy_conn(struct bpf_sock_ops *skops)
{
	struct tcpmesh_flow4 key = {};

	tcpmesh_proxy_conn_key(skops, &key);
	tcpmesh_proxy_conns.delete(&key);
}

/* The workload a socket belongs to: the cgroup id of the pod cgroup the agent registered (its entry
 * in tcpmesh_inbound_mode) when the socket's cgroup is that cgroup or any cgroup below it — the
 * kubelet puts every container in a child of the pod cgroup, so the socket's own cgroup is rarely
 * the pod's. Walks the socket's ancestors from the root down (workloads do not nest: the first hit
 * is the pod); the socket's own cgroup id, and *mode NULL, when none is registered.
 * bpf_sk_ancestor_cgroup_id: Linux 5.7 (cgroup_skb). */
static __always_inline __u64 tcpmesh_sk_workload(struct bpf_sock *sk, __u32 **mode)
{
#pragma unroll
	for (int level = 1; level <= TCPMESH_MAX_CGROUP_LEVEL; level++) {
		__u64 id = bpf_sk_ancestor_cgroup_id(sk, level);

		if (!id)
			break; /* above the socket's own level: no registered ancestor */
		*mode = tcpmesh_inbound_mode.lookup(&id);
		if (*mode)
			return id;
	}
	*mode = 0;
	return bpf_sk_cgroup_id(sk);
}

static __always_inline void tcpmesh_proxy_conn_key6(struct bpf_sock_ops *skops, struct tcpmesh_flow6 *key)
{
	key->saddr[0] = *(volatile __u32 *)&skops->local_ip6[0]; /* 4-byte ctx loads: clang would merge two */
	key->saddr[1] = *(volatile __u32 *)&skops->local_ip6[1];
	key->saddr[2] = *(volatile __u32 *)&skops->local_ip6[2];
	key->saddr[3] = *(volatile __u32 *)&skops->local_ip6[3];
	key->daddr[0] = *(volatile __u32 *)&skops->remote_ip6[0];
	key->daddr[1] = *(volatile __u32 *)&skops->remote_ip6[1];
	key->daddr[2] = *(volatile __u32 *)&skops->remote_ip6[2];
	key->daddr[3] = *(volatile __u32 *)&skops->remote_ip6[3];
	key->sport = bpf_htons((__u16)skops->local_port);
	key->dport = bpf_htons(tcpmesh_remote_port(skops));
}

/* The same for the inbound proxy's IPv6 connections (tcpmesh_pxconn6). */
static __always_inline void tcpmesh_record_proxy_conn6(struct bpf_sock_ops *skops)
{
	struct tcpmesh_flow6 key = {};
	__u32 one = 1;

	tcpmesh_proxy_conn_key6(skops, &key);
	if (tcpmesh_pxconn6.update(&key, &one) != 0) {
		tcpmesh_count(TCPMESH_R_MAP_UPDATE_FAILED);
		return;
	}
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	tcpmesh_count(TCPMESH_R_PROXY_CONN);
}

static __always_inline void tcpmesh_forget_proxy_conn6(struct bpf_sock_ops *skops)
{
	struct tcpmesh_flow6 key = {};

	tcpmesh_proxy_conn_key6(skops, &key);
	tcpmesh_pxconn6.delete(&key);
}

/* A SYN into a pod that did not come through the inbound proxy (either family): count it, and say
 * whether to drop it (the receiving socket's workload is STRICT). */
static __always_inline int tcpmesh_plaintext_syn(struct __sk_buff *skb)
{
	struct tcpmesh_plaintext zero = {};
	struct tcpmesh_plaintext *counts;
	struct bpf_sock *sk;
	__u32 *mode;
	__u64 cgroup;

	sk = skb->sk;
	if (!sk)
		return TCPMESH_ALLOW;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return TCPMESH_ALLOW;
	cgroup = tcpmesh_sk_workload(sk, &mode);
	counts = tcpmesh_plaintext.lookup_or_try_init(&cgroup, &zero);
	if (mode && *mode == TCPMESH_INBOUND_STRICT) {
		if (counts)
			counts->rejected += 1;
		tcpmesh_count(TCPMESH_R_PLAINTEXT_REJECTED);
		return TCPMESH_DENY;
	}
	if (counts)
		counts->accepted += 1;
	tcpmesh_count(TCPMESH_R_PLAINTEXT_ACCEPTED);
	return TCPMESH_ALLOW;
}

/* TCP SYN (not SYN-ACK) into a pod from outside the mesh: count it, and say whether to drop it. */
static __always_inline int tcpmesh_inbound_verdict(struct __sk_buff *skb)
{
	struct iphdr iph;
	__u8 tcp[14];
	struct tcpmesh_flow4 key = {};

	if (skb->protocol != bpf_htons(0x0800) || bpf_skb_load_bytes(skb, 0, &iph, sizeof(iph)) != 0)
		return TCPMESH_ALLOW;
	if (iph.protocol != IPPROTO_TCP || iph.ihl < 5 ||
	    bpf_skb_load_bytes(skb, iph.ihl * 4, tcp, sizeof(tcp)) != 0)
		return TCPMESH_ALLOW;
	if ((tcp[13] & 0x12) != 0x02) /* SYN without ACK: a new connection into the pod */
		return TCPMESH_ALLOW;
	if (iph.saddr == iph.daddr || (bpf_ntohl(iph.saddr) >> 24) == 127)
		return TCPMESH_ALLOW; /* the pod talking to itself */
	key.saddr = iph.saddr;
	key.daddr = iph.daddr;
	__builtin_memcpy(&key.sport, &tcp[0], 2);
	__builtin_memcpy(&key.dport, &tcp[2], 2);
	if (tcpmesh_proxy_conns.lookup(&key))
		return TCPMESH_ALLOW; /* through the inbound proxy: mTLS on the wire */
	return tcpmesh_plaintext_syn(skb);
}

/* The same for IPv6. Extension headers (hop-by-hop, routing, destination options; a reassembled
 * packet has no fragment header left) are walked, up to TCPMESH_IP6_EXT_MAX of them; a packet whose
 * TCP header lies beyond them cannot be read, so for a STRICT pod it is treated as a plaintext SYN
 * (dropped): an extension header must never be a way in. */
#define TCPMESH_IP6_EXT_MAX 4
static __always_inline int tcpmesh_inbound_verdict6(struct __sk_buff *skb)
{
	struct ipv6hdr ip6;
	__u8 ext[2];
	__u8 tcp[14];
	__u32 off = sizeof(ip6);
	__u8 next;
	struct tcpmesh_flow6 key = {};

	if (skb->protocol != bpf_htons(0x86DD) || bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) != 0)
		return TCPMESH_ALLOW;
	next = ip6.nexthdr;
#pragma unroll
	for (int i = 0; i < TCPMESH_IP6_EXT_MAX; i++) {
		if (next != 0 && next != 43 && next != 60 && next != 44)
			break;
		if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)) != 0)
			return tcpmesh_plaintext_syn(skb); /* unreadable: never let it pass a STRICT pod */
		off += next == 44 ? 8 : ((__u32)ext[1] + 1) * 8;
		next = ext[0];
	}
	if (next == 0 || next == 43 || next == 60 || next == 44)
		return tcpmesh_plaintext_syn(skb); /* more extension headers than we walk */
	if (next != IPPROTO_TCP)
		return TCPMESH_ALLOW;
	if (bpf_skb_load_bytes(skb, off, tcp, sizeof(tcp)) != 0)
		return tcpmesh_plaintext_syn(skb);
	if ((tcp[13] & 0x12) != 0x02) /* SYN without ACK: a new connection into the pod */
		return TCPMESH_ALLOW;
	__builtin_memcpy(key.saddr, &ip6.saddr, 16);
	__builtin_memcpy(key.daddr, &ip6.daddr, 16);
	if ((key.saddr[0] == key.daddr[0] && key.saddr[1] == key.daddr[1] && key.saddr[2] == key.daddr[2] &&
	     key.saddr[3] == key.daddr[3]) ||
	    (key.saddr[0] == 0 && key.saddr[1] == 0 && key.saddr[2] == 0 && key.saddr[3] == bpf_htonl(1)))
		return TCPMESH_ALLOW; /* the pod talking to itself */
	__builtin_memcpy(&key.sport, &tcp[0], 2);
	__builtin_memcpy(&key.dport, &tcp[2], 2);
	if (tcpmesh_pxconn6.lookup(&key))
		return TCPMESH_ALLOW; /* through the inbound proxy: mTLS on the wire */
	return tcpmesh_plaintext_syn(skb);
}

/* ---- hooks ------------------------------------------------------------------------------------ */

/*
 * cgroup/connect4 — FAIL-CLOSED. Destinations outside the capture CIDRs pass untouched (by
 * design). A destination that must be captured but whose origin cannot be recorded is refused
 * (connect() fails with EPERM) rather than sent on without an origin or in plaintext.
 */
int tcpmesh_conn4(struct bpf_sock_addr *ctx)
{
	__u32 dst = ctx->user_ip4;
	__u64 cookie = bpf_get_socket_cookie(ctx);

	tcpmesh_mark_seen(cookie);
	return tcpmesh_capture_connect(ctx, tcpmesh_fixed_verdict(ctx->type, ctx->protocol, dst), dst, 0, cookie);
}

/*
 * cgroup/connect6 — FAIL-CLOSED, as connect4, for v4-mapped destinations and for native IPv6 ones
 * in the mesh (captured, or refused when IPv6 meshing is off: never plaintext).
 */
int tcpmesh_conn6(struct bpf_sock_addr *ctx)
{
	__u32 dst = 0;
	__u64 cookie = bpf_get_socket_cookie(ctx);

	tcpmesh_mark_seen(cookie);
	if (tcpmesh_v4_mapped(ctx, &dst) != 0)
		return tcpmesh_capture_connect6(ctx, cookie);
	return tcpmesh_capture_connect(ctx, tcpmesh_fixed_verdict(ctx->type, ctx->protocol, dst), dst, 1, cookie);
}

/*
 * sockops — FAIL-CLOSED (through the proxy). If the record cannot be published the connection
 * still reaches the proxy, whose origin lookup then fails, and the proxy closes it: nothing leaks
 * in plaintext. Every other op (the SYN's TIMEOUT_INIT, RWND_INIT, NEEDS_ECN, the state changes
 * before close) returns at once.
 */
int tcpmesh_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		tcpmesh_publish_established(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			tcpmesh_forget_closed(skops);
		break;
	}
	return 1;
}

/*
 * cgroup/getsockopt — FAIL-CLOSED (through the proxy). Never blocks a getsockopt: other options,
 * and queries without a record, keep the kernel's own answer (ENOPROTOOPT, or ENOENT from
 * conntrack), on which the proxy refuses the connection.
 */
int tcpmesh_sockopt(struct bpf_sockopt *ctx)
{
	if (!tcpmesh_is_origin_query(ctx))
		return TCPMESH_ALLOW;
	tcpmesh_answer_sockopt(ctx);
	return TCPMESH_ALLOW;
}

/*
 * cgroup/getpeername4 — FAIL-OPEN (cosmetic). Without a record the app sees the redirect address
 * as its peer; the traffic itself is unaffected.
 */
int tcpmesh_peer4(struct bpf_sock_addr *ctx)
{
	tcpmesh_show_original_peer(ctx, 0);
	return TCPMESH_ALLOW;
}

/* cgroup/getpeername6 — FAIL-OPEN (cosmetic), as getpeername4, for captured AF_INET6 sockets. */
int tcpmesh_peer6(struct bpf_sock_addr *ctx)
{
	tcpmesh_show_original_peer(ctx, 1);
	return TCPMESH_ALLOW;
}

/*
 * cgroup/connect4 on the pods cgroup (the node guard) — FAIL-CLOSED. Runs after the hooks of the
 * pod's own cgroup (descendants first). A TCP connect that no pod hook marked comes from a pod
 * the agent has not attached (yet): refused with EPERM, except to loopback and the redirect
 * address. Captured pods pass untouched (their destination is already rewritten).
 */
int tcpmesh_guard4(struct bpf_sock_addr *ctx)
{
	if (tcpmesh_take_seen(ctx))
		return TCPMESH_ALLOW;
	return tcpmesh_guard_verdict(ctx, tcpmesh_guard_exempt4(ctx->user_ip4));
}

/* cgroup/connect6 on the pods cgroup — FAIL-CLOSED, as guard4; native IPv6 is refused too. */
int tcpmesh_guard6(struct bpf_sock_addr *ctx)
{
	if (tcpmesh_take_seen(ctx))
		return TCPMESH_ALLOW;
	return tcpmesh_guard_verdict(ctx, tcpmesh_guard_exempt6(ctx));
}

/*
 * sockops on the proxy's cgroup — FAIL-CLOSED for STRICT pods: if the inbound proxy's connection
 * cannot be recorded, its SYN is treated as plaintext and a STRICT pod refuses it (the client sees
 * STATUS UNREACHABLE); PERMISSIVE pods are unaffected.
 */
int tcpmesh_pxops(struct bpf_sock_ops *skops)
{
	__u32 family = skops->family;

	if (family != 2 /* AF_INET */ && family != 10 /* AF_INET6 */)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		if (family == 2)
			tcpmesh_record_proxy_conn(skops);
		else
			tcpmesh_record_proxy_conn6(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != BPF_TCP_CLOSE)
			break;
		if (family == 2)
			tcpmesh_forget_proxy_conn(skops);
		else
			tcpmesh_forget_proxy_conn6(skops);
		break;
	}
	return 1;
}

/*
 * cgroup_skb/ingress on pod cgroups — FAIL-CLOSED for STRICT pods (a SYN from outside the mesh is
 * dropped: the sender times out), FAIL-OPEN for everything else (packets that are not a new TCP
 * connection, PERMISSIVE pods, packets that cannot be parsed).
 */
int tcpmesh_inb4(struct __sk_buff *skb)
{
	return tcpmesh_inbound_verdict(skb);
}

/* cgroup_skb/ingress on pod cgroups — the same for IPv6 SYNs (beside tcpmesh_inb4: each passes the
 * other family's packets untouched); FAIL-CLOSED for a STRICT pod also when the TCP header cannot
 * be found behind extension headers. */
int tcpmesh_inb6(struct __sk_buff *skb)
{
	return tcpmesh_inbound_verdict6(skb);
}
