/* SPDX-License-Identifier: Apache-2.0 */
/*
 * probe.c — tiny programs `tcpmesh doctor` loads (never attaches) to find out whether this kernel
 * accepts each program type, expected attach type and helper the capture modes use. Each function
 * exercises one capability with the smallest body the verifier accepts; agent/host/probes.py maps
 * function -> check name. Nothing here is part of the data path.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

/* cgroup/connect4 and connect6: cookie, pid/uid, cgroup id, comm, rewrite the destination */
int probe_connect4(struct bpf_sock_addr *ctx)
{
	char comm[16];
	__u64 sum = bpf_get_socket_cookie(ctx) + bpf_get_current_pid_tgid() + bpf_get_current_uid_gid() +
		    bpf_get_current_cgroup_id();

	bpf_get_current_comm(&comm, sizeof(comm));
	if (sum == 1 && comm[0] == 0)
		ctx->user_port = 0;
	return 1;
}

int probe_connect6(struct bpf_sock_addr *ctx)
{
	if (bpf_get_socket_cookie(ctx) == 1)
		ctx->user_port = 0;
	return 1;
}

/* cgroup/getpeername4/6 (attach types since 5.8) */
int probe_peer4(struct bpf_sock_addr *ctx)
{
	if (bpf_get_socket_cookie(ctx) == 1)
		ctx->user_port = 0;
	return 1;
}

int probe_peer6(struct bpf_sock_addr *ctx)
{
	if (bpf_get_socket_cookie(ctx) == 1)
		ctx->user_port = 0;
	return 1;
}

/* sockops: reading the local address at ACTIVE_ESTABLISHED */
int probe_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && bpf_get_socket_cookie(skops) == 1 &&
	    skops->local_ip4 == 0)
		return 0;
	return 1;
}

/* cgroup/getsockopt: overriding optlen and retval (volatile: see lib/sockopt.h) */
int probe_sockopt(struct bpf_sockopt *ctx)
{
	if (ctx->level == 0 && ctx->optname == 0x746d) {
		*(volatile __s32 *)&ctx->optlen = 0;
		*(volatile __s32 *)&ctx->retval = 0;
	}
	return 1;
}

/* tc cls_bpf */
int probe_sched_cls(struct __sk_buff *skb)
{
	return skb->len == 0 ? TC_ACT_OK : TC_ACT_UNSPEC;
}

/* tc: bpf_skc_lookup_tcp + bpf_sk_release */
int probe_skc_lookup(struct __sk_buff *skb)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);

	if (sk)
		bpf_sk_release(sk);
	return TC_ACT_UNSPEC;
}

/* tc: bpf_sk_assign (needs a looked-up socket) and writing skb->mark */
int probe_sk_assign(struct __sk_buff *skb)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	long err;

	if (!sk)
		return TC_ACT_UNSPEC;
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err == 0)
		skb->mark |= 1;
	return TC_ACT_UNSPEC;
}
