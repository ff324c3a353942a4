/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * route_table tuner: propose a larger net.ipv6.route.max_size when a
 * namespace's IPv6 destination table nears it.
 *
 * bpftune counts the routes fib6_age visits during fib6_run_gc.  The kernel
 * keeps that number itself (net->ipv6.rt6_stats: fib_rt_entries, plus
 * fib_rt_cache for cached exception routes, as /proc/net/rt6_stats shows), so
 * any hook that knows the namespace can read it.  Two signals, each checked
 * where it fires, because a table can fill where only one of them does:
 *   dst_table  tracepoint fib6:fib6_table_lookup (tp_btf / raw_tp): every
 *              IPv6 route lookup, so it is sampled.  It fires wherever
 *              traffic flows, and on routes added through a gateway (the
 *              kernel looks the gateway up).
 *   dst_gc     fentry / kprobe on fib6_run_gc: the garbage collector bpftune
 *              hooks.  It runs from its timer, when dst allocations pass
 *              net.ipv6.route.gc_thresh, on a write to net.ipv6.route.flush
 *              and whenever a device goes down (ndisc), so it also sees a
 *              namespace whose table fills without a single lookup: links
 *              that come up (each adds its prefix, local and multicast
 *              routes) and go, as containers do with dummy or veth links.
 * Proposals go through bpftune_send_sysctl_event (one per namespace per 25
 * ms); update[0].old[1] carries the entry count so user space can re-check
 * against the value current when it handles the event.
 */
#include "pybpftune.bpf.h"

struct bpftune_sample dst_table_sample = {};

static __always_inline int dst_table_check(struct net *net)
{
	struct bpftune_event event = {};
	__s64 old[BPFTUNE_MAX_VALUES] = {}, new[BPFTUNE_MAX_VALUES] = {};
	struct rt6_statistics *stats;
	__s64 count, max_size;

	if (!net)
		return 0;
	stats = BPF_CORE_READ(net, ipv6.rt6_stats);
	if (!stats)
		return 0;
	count = BPF_CORE_READ(stats, fib_rt_entries) + (__s64)BPF_CORE_READ(stats, fib_rt_cache);
	max_size = BPF_CORE_READ(net, ipv6.sysctl.ip6_rt_max_size);
	if (max_size <= 0 || !BPFTUNE_NEARLY_FULL(count, max_size))
		return 0;
	old[0] = max_size;
	old[1] = count;
	new[0] = BPFTUNE_GROW(max_size);
	new[1] = count;
	return bpftune_send_sysctl_event(net, ROUTE_TABLE_FULL, ROUTE_TABLE_IPV6_MAX_SIZE, old, new, &event);
}

BPFTUNE_TP(dst_table, fib6_table_lookup, const struct net *net, const struct fib6_result *res,
	   struct fib6_table *table, const struct flowi6 *flp)
{
	if (!bpftune_sample(&dst_table_sample))
		return 0;
	return dst_table_check((struct net *)net);
}

#ifndef BPFTUNE_LEGACY
BPFTUNE_FENTRY(dst_gc, fib6_run_gc, unsigned long expires, struct net *net, bool force)
{
	/* fentry programs must return 0 (Linux 6.12's verifier enforces it). */
	dst_table_check(net);
	return 0;
}
#endif

BPFTUNE_KPROBE(dst_gc, fib6_run_gc, unsigned long expires, struct net *net, bool force)
{
	return dst_table_check(net);
}
