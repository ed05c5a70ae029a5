/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tcpmesh_abi.h — the one kernel/user ABI of tcpmesh's eBPF capture.
 *
 * Everything that crosses the kernel/user boundary is defined here and nowhere else: the record a
 * proxy reads with getsockopt(SOL_IP, TCPMESH_SO_ORIGIN), the keys and values of every map user
 * space reads or writes, and the reason-counter codes. agent/capture/abi.py mirrors it with ctypes;
 * tests/bpf/test_abi_layout.py compiles this header with the host C compiler and with bcc and
 * checks both against the mirror. Rules:
 *   - fixed-width types only, every padding byte named (and zeroed by the writer);
 *   - byte order stated on every address/port field;
 *   - bump TCPMESH_ABI_VERSION on any layout or meaning change; reason codes are never reused.
 *
 * Compiles both as BPF (bcc, kernel stub tree) and as host C (gcc, linux-libc-dev).
 */
#ifndef TCPMESH_ABI_H
#define TCPMESH_ABI_H

#include <linux/types.h>

/* 2: guard programs, reasons 15-16, a fixed-size counters map (the slots below), pinned maps.
 * 3: origins in socket storage (tcpmesh_sock_origin); tcpmesh_peer_key carries both sequence
 *    numbers of the handshake, so a record answers only for the connection it was made for, once;
 *    reason 20; reason 7 no longer counted.
 * 4: origins in a slot array indexed by socket cookie (tcpmesh_sock_slots), or where a slot is taken
 *    in a preallocated LRU keyed by socket cookie (tcpmesh_cookie_origin): no allocation and no
 *    hashing at connect; released when the socket closes (sockops STATE_CB, on for captured
 *    sockets only); the hand-over in a slot array too (tcpmesh_handover_slots), tcpmesh_peer_origin
 *    where a slot is in use; tcpmesh_sock_origin gone; reasons 21-24. struct tcpmesh_origin is unchanged: records of ABI 3 and 4
 *    have the same layout (TCPMESH_ORIGIN_LAYOUT_SINCE).
 * 5: only destinations in the mesh are captured (tcpmesh_mesh_dsts, struct tcpmesh_dst_key of
 *    both families); every other TCP connect leaves from the pod itself, refused at connect() when
 *    tcpmesh_settings says TCPMESH_SETTING_PASSTHROUGH_DENY, and reported as one struct
 *    tcpmesh_egress_event in the ring buffer tcpmesh_egress; reasons 25-27.
 * 6: dual stack: connect6 captures native IPv6 destinations in the mesh; struct tcpmesh_origin
 *    carries dst_ip6 (64 bytes; the slot and hand-over structs grow with it); SOL_IPV6/
 *    IP6T_SO_ORIGINAL_DST answered; tcpmesh_pxconn6 and tcpmesh_inb6 (STRICT for IPv6);
 *    TCPMESH_SETTING_IPV6_OFF; reasons 28-30; reason 13 retired. */
#define TCPMESH_ABI_VERSION 6
/* The first ABI version whose struct tcpmesh_origin has the layout below: a reader accepts records
 * from TCPMESH_ORIGIN_LAYOUT_SINCE to TCPMESH_ABI_VERSION (during an upgrade the previous set's
 * getsockopt hook may still answer). */
#define TCPMESH_ORIGIN_LAYOUT_SINCE 6
/* Records of versions TCPMESH_ORIGIN_LEGACY_SINCE .. TCPMESH_ORIGIN_LAYOUT_SINCE - 1 are the first
 * 48 bytes of struct tcpmesh_origin (no dst_ip6): a reader accepts them too. */
#define TCPMESH_ORIGIN_LEGACY_SINCE 3
#define TCPMESH_ORIGIN_LEGACY_SIZE 48

/* ---- getsockopt ABI (answered by the cgroup/getsockopt hook on the proxy's cgroup) ---------- */

#define TCPMESH_SOL_IP 0 /* SOL_IP == IPPROTO_IP */
#define TCPMESH_SOL_IPV6 41 /* SOL_IPV6 == IPPROTO_IPV6 */

/* Netfilter's SO_ORIGINAL_DST (linux/netfilter_ipv4.h). Answer: struct tcpmesh_sockaddr_in; only
 * for an IPv4 destination. */
#define TCPMESH_SO_ORIGINAL_DST 80
/* Netfilter's IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h), asked at SOL_IPV6. Answer:
 * struct tcpmesh_sockaddr_in6; an IPv4 destination as ::ffff:a.b.c.d. */
#define TCPMESH_IP6T_SO_ORIGINAL_DST 80

/*
 * tcpmesh's own option at level SOL_IP. Answer: struct tcpmesh_origin.
 * 0x746d ("tm") = 29805 is far outside every range the kernel uses at SOL_IP: IP_* options
 * (1..52 as of 6.18), the ip/arp/eb-tables and bpfilter controls (64..69, 80, 96..99, 128..),
 * and IPVS (1024+64 ..). The kernel itself answers ENOPROTOOPT for it, so a socket without a
 * record (or a host without the hook) gets ENOPROTOOPT, never garbage.
 * The caller must pass optlen >= sizeof(struct tcpmesh_origin): the hook can only shrink optlen.
 * A connection's record answers once (this option or SO_ORIGINAL_DST, whichever comes first):
 * ask for the whole record in one call.
 */
#define TCPMESH_SO_ORIGIN 0x746d

/* struct sockaddr_in as SO_ORIGINAL_DST returns it (16 bytes). */
struct tcpmesh_sockaddr_in {
	__u16 family;   /* AF_INET (2), host order */
	__u16 port;     /* network order */
	__u32 addr;     /* network order */
	__u8 zero[8];
};

/* struct sockaddr_in6 as IP6T_SO_ORIGINAL_DST returns it (28 bytes). */
struct tcpmesh_sockaddr_in6 {
	__u16 family;       /* AF_INET6 (10), host order */
	__u16 port;         /* network order */
	__u32 flowinfo;     /* 0 */
	__u32 addr[4];      /* network order */
	__u32 scope_id;     /* 0 */
};

#define TCPMESH_COMM_LEN 16

/*
 * The original destination of a captured connection and who opened it.
 * Written by cgroup/connect4 at connect() time, in the context of the connecting task, under the
 * client socket's cookie; the value of tcpmesh_cookie_origin and of tcpmesh_peer_origin.
 */
struct tcpmesh_origin {
	__u32 dst_ip4;      /*  0: original destination address, network order */
	__u16 dst_port;     /*  4: original destination port, network order */
	__u16 version;      /*  6: TCPMESH_ABI_VERSION of the writer */
	__u32 pid;          /*  8: tgid of the connecting task (init pid namespace) */
	__u32 uid;          /* 12: uid of the connecting task (init user namespace) */
	__u64 cgroup_id;    /* 16: cgroup v2 id of the connecting task (= inode of its cgroup dir) */
	__u64 cookie;       /* 24: socket cookie of the client socket */
	char comm[TCPMESH_COMM_LEN]; /* 32: task comm, NUL-padded */
	__u32 dst_ip6[4];   /* 48: IPv6 destination, network order; all 0 for an IPv4 one (in dst_ip4;
	                           then dst_ip4 is 0 for an IPv6 one). Not in records before ABI 6. */
};                      /* 64 bytes */

/* ---- map keys and values ------------------------------------------------------------------ */

/*
 * Value of tcpmesh_sock_slots, the per-socket record of a captured client socket: slot
 * (cookie & (TCPMESH_SOCK_SLOTS - 1)), owned by the socket whose cookie is in ``owner``. A socket
 * takes a free slot with an atomic compare-and-swap (0 -> its cookie) and gives it back at its
 * TCP_CLOSE; only the owner writes it, and every access by the owner runs under its socket's
 * lock, so a reader that finds its own cookie in ``owner`` reads a record nobody else changes.
 */
struct tcpmesh_sock_slot {
	__u64 owner;                  /*  0: socket cookie of the owner, 0 = free */
	struct tcpmesh_origin origin; /*  8 */
};                                /* 72 bytes */

/*
 * Key of tcpmesh_peer_origin: one TCP connection from a pod to the redirect address. The client's
 * sockops (ACTIVE_ESTABLISHED) writes the record under its (local ip, local port, snd_nxt,
 * rcv_nxt); the getsockopt hook on the proxy's accepted socket rebuilds the same key from that
 * socket: (peer ip, peer port, rcv_nxt - bytes_received, snd_una - bytes_acked). The two initial
 * sequence numbers are random per connection, so a later connection that reuses the client's
 * ip/port never matches an old record.
 */
struct tcpmesh_peer_key {
	__u32 ip4;          /*  0: client local address, network order */
	__u16 port;         /*  4: client local port, network order */
	__u16 pad;          /*  6: always 0 */
	__u32 client_seq;   /*  8: client's initial sequence number + 1, host order */
	__u32 server_seq;   /* 12: proxy's initial sequence number + 1, host order */
};                      /* 16 bytes */

/*
 * Value of tcpmesh_handover_slots: the hand-over record of one connection in slot
 * (client_seq ^ server_seq) & (TCPMESH_HANDOVER_SLOTS - 1). ``state`` moves FREE -> WRITING ->
 * READY (pod sockops at ACTIVE_ESTABLISHED) -> ANSWERING -> FREE (the getsockopt hook of the
 * accepted socket whose rebuilt key equals ``key``), each step a compare-and-swap, so exactly one
 * writer fills a slot and exactly one reader answers from it, once.
 */
enum tcpmesh_handover_state {
	TCPMESH_HO_FREE = 0,
	TCPMESH_HO_WRITING = 1,
	TCPMESH_HO_READY = 2,
	TCPMESH_HO_ANSWERING = 3,
};

struct tcpmesh_handover_slot {
	__u64 state;                  /*  0: enum tcpmesh_handover_state (64 bits: BPF compare-and-swap) */
	__u64 stamp;                  /*  8: bpf_ktime_get_ns() when it became READY */
	struct tcpmesh_peer_key key;  /* 16 */
	struct tcpmesh_origin origin; /* 32 */
};                                /* 96 bytes */

/* Key of the LPM trie tcpmesh_capture_cidrs (the layout struct bpf_lpm_trie_key requires). */
struct tcpmesh_cidr_key {
	__u32 prefixlen;    /* 0: 0..32 */
	__u32 ip4;          /* 4: network address, network order */
};                      /* 8 bytes */

/* Value of tcpmesh_capture_cidrs: longest prefix wins, so a BYPASS /32 can punch a hole in a
 * CAPTURE /8. A destination that matches no prefix is not captured. */
struct tcpmesh_cidr_value {
	__u32 action;       /* 0: enum tcpmesh_cidr_action */
};                      /* 4 bytes */

enum tcpmesh_cidr_action {
	TCPMESH_CIDR_BYPASS = 0,
	TCPMESH_CIDR_CAPTURE = 1,
};

/* ---- the mesh's destinations and egress outside it (docs/capture.md, "Only the mesh") -------- */

/*
 * Key of the LPM trie tcpmesh_mesh_dsts: which destinations are in the mesh. One layout for both
 * families and for three kinds of entry; ``prefixlen`` counts the bits after it that must match:
 *   a prefix of either family          32 + prefix length     (family, pad, then address bits)
 *   one address, any port              32 + 128 (IPv4 too: its addr[1..3] are always 0)
 *   one address and one port           32 + 128 + 16          (Service addresses, later)
 * The connect hooks look up the full key (address and port of the connect), so the longest entry
 * wins: address+port before address before prefix.
 */
struct tcpmesh_dst_key {
	__u32 prefixlen;    /*  0: see above */
	__u8 family;        /*  4: TCPMESH_DST_INET or TCPMESH_DST_INET6 */
	__u8 pad[3];        /*  5: always 0 */
	__u32 addr[4];      /*  8: network order; IPv4 in addr[0], addr[1..3] = 0 */
	__u16 port;         /* 24: network order */
	__u16 pad2;         /* 26: always 0 (never matched: prefixlen <= TCPMESH_DST_KEY_BITS) */
};                      /* 28 bytes */

#define TCPMESH_DST_INET 4
#define TCPMESH_DST_INET6 6
#define TCPMESH_DST_ADDR_BITS (32 + 128)      /* prefixlen of "one address, any port" */
#define TCPMESH_DST_KEY_BITS (32 + 128 + 16)  /* prefixlen of "one address and port"; lookups use it */

/* Value of tcpmesh_mesh_dsts. */
struct tcpmesh_dst_value {
	__u32 kind;         /* 0: enum tcpmesh_dst_kind */
};                      /* 4 bytes */

enum tcpmesh_dst_kind {
	TCPMESH_DST_OUTSIDE = 0,   /* a hole in a longer-prefixed entry: outside the mesh */
	TCPMESH_DST_WORKLOAD = 1,  /* a workload address of the registry: captured */
	TCPMESH_DST_SERVICE = 2,   /* a Service address (+port): captured */
};

/* Value of tcpmesh_settings (an array with one entry, key 0): node-wide switches the agent sets
 * from its config before it attaches anything. */
struct tcpmesh_settings {
	__u32 flags;        /* 0: TCPMESH_SETTING_* */
};                      /* 4 bytes */

/* policy.outbound_passthrough: DENY — a TCP connect to a destination outside the mesh fails with
 * EPERM in the connect hook (otherwise it leaves from the pod, untouched). */
#define TCPMESH_SETTING_PASSTHROUGH_DENY 1
/* capture.ipv6: false — IPv6 is not meshed on this node: a TCP connect to an IPv6 destination in
 * the mesh fails with EPERM (never plaintext); IPv6 outside the mesh is decided as above. */
#define TCPMESH_SETTING_IPV6_OFF 2

/* One TCP connect from a pod to a destination outside the mesh, allowed or denied, as the connect
 * hook saw it; records of the ring buffer tcpmesh_egress, read by the agent (telemetry only: the
 * connection itself never touches the agent). */
struct tcpmesh_egress_event {
	__u64 cgroup_id;    /*  0: cgroup v2 id of the connecting task */
	__u32 pid;          /*  8: tgid (init pid namespace) */
	__u32 uid;          /* 12: init user namespace */
	__u32 addr[4];      /* 16: destination, network order; IPv4 in addr[0] */
	__u16 port;         /* 32: destination port, network order */
	__u8 family;        /* 34: TCPMESH_DST_INET or TCPMESH_DST_INET6 */
	__u8 denied;        /* 35: 1 = refused at connect() (passthrough DENY), 0 = let through */
	__u32 pad;          /* 36: always 0 */
	char comm[TCPMESH_COMM_LEN]; /* 40: task comm, NUL-padded */
};                      /* 56 bytes */

/* ---- inbound mTLS mode (PeerAuthentication, docs/policy.md) -------------------------------- */

/* Value of tcpmesh_inbound_mode (key: the pod's cgroup id). A pod without an entry is PERMISSIVE. */
#define TCPMESH_INBOUND_PERMISSIVE 1
#define TCPMESH_INBOUND_STRICT 2

/* An IPv4 TCP connection as its SYN carries it: the initiator's address and port, then the
 * responder's; all in network byte order. Key of tcpmesh_proxy_conns. */
struct tcpmesh_flow4 {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

/* The same for IPv6: key of tcpmesh_pxconn6. */
struct tcpmesh_flow6 {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
};                      /* 36 bytes */

/* Per-CPU value of tcpmesh_plaintext (key: the pod's cgroup id): SYNs from outside the mesh. */
struct tcpmesh_plaintext {
	__u64 rejected; /* dropped: the pod is STRICT */
	__u64 accepted; /* let in: the pod is PERMISSIVE */
};

/* ---- reason counters (index into the per-CPU array tcpmesh_counters) ----------------------- */
/* Append only; never renumber or reuse a code. agent/capture/abi.py mirrors the names. */
enum tcpmesh_reason {
	TCPMESH_R_CAPTURED = 0,            /* connect4: destination rewritten to the redirect address */
	TCPMESH_R_NOT_CAPTURED = 1,        /* connect4: IPv4 TCP, destination outside the capture CIDRs
	                                      (capture.bypass: never captured, no event) */
	TCPMESH_R_NOT_TCP = 2,             /* connect4: not a TCP stream socket (UDP connect, ...) */
	TCPMESH_R_LOOPBACK = 3,            /* connect4: 127.0.0.0/8, never captured */
	TCPMESH_R_TO_REDIRECT = 4,         /* connect4: destination is the redirect address itself */
	TCPMESH_R_MAP_UPDATE_FAILED = 5,   /* any hook: a map update failed (connect4 then refuses) */
	TCPMESH_R_REKEYED = 6,             /* sockops: record published under the connection's peer key */
	TCPMESH_R_STALE_PEER_CLEARED = 7,  /* retired in ABI 3 (records are bound to their handshake):
	                                      never counted */
	TCPMESH_R_ORIGIN_ANSWERED = 8,     /* getsockopt: TCPMESH_SO_ORIGIN answered */
	TCPMESH_R_ORIGDST_ANSWERED = 9,    /* getsockopt: SO_ORIGINAL_DST answered */
	TCPMESH_R_ORIGIN_MISSING = 10,     /* getsockopt: no record for the peer (caller sees errno) */
	TCPMESH_R_OPTLEN_SHORT = 11,       /* getsockopt: caller's buffer too small (caller sees errno) */
	TCPMESH_R_PEERNAME_REWRITTEN = 12, /* getpeername4/6: app shown its original destination */
	TCPMESH_R_IPV6 = 13,               /* retired in ABI 6 (native IPv6 goes through the mesh lookup:
	                                      captured6, outside_mesh_*): never counted */
	TCPMESH_R_V4MAPPED = 14,           /* connect6: captured a v4-mapped destination (also counted
	                                      as captured) */
	TCPMESH_R_GUARD_DENIED = 15,       /* guard: TCP connect from a pod cgroup that is not captured
	                                      (yet): refused with EPERM */
	TCPMESH_R_GUARD_EXEMPT = 16,       /* guard: such a connect to loopback or the redirect address,
	                                      let through */
	TCPMESH_R_PROXY_CONN = 17,         /* proxy sockops: the inbound proxy's connection to a pod
	                                      recorded (its SYN may enter a strict pod) */
	TCPMESH_R_PLAINTEXT_REJECTED = 18, /* inbound: a SYN from outside the mesh dropped (STRICT pod) */
	TCPMESH_R_PLAINTEXT_ACCEPTED = 19, /* inbound: a SYN from outside the mesh let in (PERMISSIVE) */
	TCPMESH_R_ORIGIN_CLAIMED = 20,     /* getsockopt: the record was answered and deleted (one answer
	                                      per connection) */
	TCPMESH_R_ORIGIN_CLOSED = 21,      /* sockops: a captured socket closed, its record deleted */
	TCPMESH_R_SLOT_TAKEN = 22,         /* connect4/6: the socket's slot belongs to a live socket: its
	                                      record went to the LRU instead */
	TCPMESH_R_HANDOVER_SLOT_TAKEN = 23, /* sockops: the connection's hand-over slot was in use: the
	                                      record went to tcpmesh_peer_origin instead */
	TCPMESH_R_HANDOVER_RECLAIMED = 24, /* sockops: a hand-over slot nobody answered within
	                                      TCPMESH_HANDOVER_TTL_NS was reused (its proxy was gone) */
	TCPMESH_R_OUTSIDE_MESH_ALLOWED = 25, /* connect4/6: TCP to a destination outside the mesh, left
	                                      alone: it leaves from the pod itself */
	TCPMESH_R_OUTSIDE_MESH_DENIED = 26, /* connect4/6: the same refused with EPERM (passthrough DENY) */
	TCPMESH_R_EGRESS_EVENT_LOST = 27,  /* connect4/6: tcpmesh_egress was full: no event for a connect
	                                      outside the mesh (the decision was still made and counted) */
	TCPMESH_R_CAPTURED6 = 28,          /* connect6: captured a native IPv6 destination in the mesh (also
	                                      counted as captured) */
	TCPMESH_R_IPV6_REFUSED = 29,       /* connect6: an IPv6 destination in the mesh while IPv6 meshing
	                                      is off (TCPMESH_SETTING_IPV6_OFF): EPERM */
	TCPMESH_R_FAMILY_MISMATCH = 30,    /* getsockopt: SOL_IP/SO_ORIGINAL_DST for an IPv6 destination
	                                      (nothing consumed; ask TCPMESH_SO_ORIGIN or SOL_IPV6) */
	TCPMESH_R_GUARD_HOST_NETWORK = 31, /* guard: a TCP connect from a socket of the agent's own network
	                                      namespace (hostNetwork pods, the agent itself) let through
	                                      (only with -DTCPMESH_GUARD_NETNS_COOKIE) */
	TCPMESH_R_ADMIN_PORT_DENIED = 32,  /* connect4/6: a pod's TCP connect to its node's admin address
	                                      and port refused with EPERM (only with -DTCPMESH_ADMIN_PORT) */
	TCPMESH_R_MAX = 33,
};

/* Entries of the tcpmesh_counters map: room for appended reasons without changing the map. */
#define TCPMESH_R_SLOTS 64

/* ---- ebpf-tc mode (bpf/capture_tc.c) ------------------------------------------------------- */

/*
 * The skb mark bit capture_tc.c ORs into a packet it assigned to a proxy socket (and the iptables
 * mode's TPROXY rules set). The node has `ip rule fwmark TCPMESH_STEER_MARK/TCPMESH_STEER_MARK
 * lookup <table>` with `local 0.0.0.0/0 dev lo` in that table, so marked packets are delivered
 * locally instead of forwarded (agent/capture/steering.py). One bit: other marks are kept.
 */
#define TCPMESH_STEER_MARK 0x10000000

/*
 * The socket mark (SO_MARK) of the inbound proxy's connections to local pods that leave from the
 * client pod's own address (IP_TRANSPARENT). bpf/source_return.c, on tc ingress of each pod's
 * node-side veth, ORs TCPMESH_STEER_MARK into a packet whose 4-tuple belongs to a socket carrying
 * this mark, so the fwmark rule delivers the pod's replies to the proxy instead of forwarding them
 * to the client's node (agent/capture/source_return.py). Never set on a packet: only on sockets.
 */
#define TCPMESH_SOURCE_MARK 0x20000000

/* Reason counters of the tc program (index into its own per-CPU array tcpmesh_tc_counters).
 * Append only; never renumber or reuse a code. agent/capture/abi.py mirrors the names. */
enum tcpmesh_tc_reason {
	TCPMESH_TC_R_SYN_ASSIGNED = 0,     /* SYN of a captured connection assigned to the proxy listener */
	TCPMESH_TC_R_EST_ASSIGNED = 1,     /* packet of a connection the proxy owns assigned to its socket */
	TCPMESH_TC_R_NOT_TCP = 2,          /* not IPv4 TCP (or a non-first fragment): passed */
	TCPMESH_TC_R_LOOPBACK = 3,         /* destination 127.0.0.0/8 or 0.0.0.0/8: passed */
	TCPMESH_TC_R_NOT_CAPTURED = 4,     /* destination outside the capture CIDRs or a node address: passed */
	TCPMESH_TC_R_NOT_OURS = 5,         /* non-SYN, no proxy socket, never captured (e.g. the pod
	                                      answering as a server): passed */
	TCPMESH_TC_R_ORPHAN_DROPPED = 6,   /* non-SYN of a captured connection whose proxy socket is
	                                      gone (agent restarted): dropped, never forwarded */
	TCPMESH_TC_R_NO_LISTENER = 7,      /* SYN to capture but no proxy listener: dropped (fail-closed) */
	TCPMESH_TC_R_ASSIGN_FAILED = 8,    /* bpf_sk_assign failed: dropped */
	TCPMESH_TC_R_MAP_UPDATE_FAILED = 9, /* capture record not stored (the SYN is still assigned) */
	TCPMESH_TC_R_SHORT = 10,           /* headers not readable even after a pull: passed */
	TCPMESH_TC_R_MAX = 11,
};

#endif /* TCPMESH_ABI_H */
