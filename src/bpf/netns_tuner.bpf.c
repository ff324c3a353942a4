/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * netns tuner: tell user space when a network namespace is created or dies,
 * with its cookie and inode, so the daemon can map cookies to namespaces
 * without entering each one or scanning processes.
 *
 * netns_create: the return of copy_net_ns() (the one path by which clone()
 *   and unshare() make a namespace), when it returned a new one:
 *     fexit (full variant), kretprobe (both variants).
 *   copy_net_ns keeps its signature across 5.x and 6.x, unlike setup_net
 *   (bpftune's hook, whose arguments changed).
 * netns_destroy: __put_net(), called once the last reference is dropped:
 *     fentry (full variant), kprobe (both variants).
 * No tracepoint fires for either: on kernels without fentry and kprobes
 * (e.g. the development host) both signals are unavailable and user space
 * falls back to watching /run/netns and resolving unknown cookies lazily.
 */
#include "pybpftune.bpf.h"

static __always_inline void netns_send(struct net *net, __u32 scenario)
{
	struct bpftune_event event = {};
	struct netns_event *e = (struct netns_event *)event.raw_data;
	__u64 cookie;

	if (!net)
		return;
	cookie = bpftune_netns_cookie(net);
	e->inum = BPF_CORE_READ(net, ns.inum);
	e->cookie = cookie;
	event.scenario_id = scenario;
	event.netns_cookie = cookie;
	bpftune_send_event(&event);
}

static __always_inline void netns_created(struct net *old_net, struct net *net)
{
	/* Without CLONE_NEWNET it returns the caller's own namespace; errors are
	 * small negative numbers. */
	if (!net || net == old_net || (unsigned long)net >= (unsigned long)-4095)
		return;
	netns_send(net, NETNS_SCENARIO_CREATE);
}

#ifndef BPFTUNE_LEGACY
SEC("fexit/copy_net_ns")
int BPF_PROG(bpftune_netns_create__fexit, unsigned long flags, struct user_namespace *user_ns, struct net *old_net,
	     struct net *net)
{
	netns_created(old_net, net);
	return 0;
}

SEC("fentry/__put_net")
int BPF_PROG(bpftune_netns_destroy__fentry, struct net *net)
{
	netns_send(net, NETNS_SCENARIO_DESTROY);
	return 0;
}
#endif

/* The kretprobe cannot see the arguments: remember old_net per task. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u64);
} bpftune_netns SEC(".maps");

SEC("kprobe/copy_net_ns")
int BPF_KPROBE(bpftune_netns_create__kprobe, unsigned long flags, struct user_namespace *user_ns, struct net *old_net)
{
	__u64 id = bpf_get_current_pid_tgid(), old = (__u64)old_net;

	bpf_map_update_elem(&bpftune_netns, &id, &old, BPF_ANY);
	return 0;
}

SEC("kretprobe/copy_net_ns")
int BPF_KRETPROBE(bpftune_netns_create__kretprobe, struct net *net)
{
	__u64 id = bpf_get_current_pid_tgid(), *old;

	old = bpf_map_lookup_elem(&bpftune_netns, &id);
	if (!old)
		return 0;
	netns_created((struct net *)*old, net);
	bpf_map_delete_elem(&bpftune_netns, &id);
	return 0;
}

SEC("kprobe/__put_net")
int BPF_KPROBE(bpftune_netns_destroy__kprobe, struct net *net)
{
	netns_send(net, NETNS_SCENARIO_DESTROY);
	return 0;
}
