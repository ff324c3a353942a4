/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * net_buffer tuner: per-cpu backlog drops (netdev_max_backlog,
 * flow_limit_cpu_bitmap) and softirq time squeeze (netdev_budget,
 * netdev_budget_usecs).  The BPF side counts and reports; the rules live in
 * Python.
 *
 * Signals and forms, best first:
 *   backlog  tp_btf / raw_tp  skb:kfree_skb with reason SKB_DROP_REASON_CPU_BACKLOG
 *                             (kernels with drop reasons, 5.17+; elsewhere the
 *                             enum is missing and the form is refused at load)
 *            fexit            enqueue_to_backlog returning NET_RX_DROP (full variant)
 *            kretprobe        the same
 *   squeeze  tp_btf / raw_tp  napi:napi_poll, sampled, reading this cpu's
 *                             softnet_data.time_squeeze
 *            fentry / kprobe  napi_complete_done, sampled
 *            (softnet_data is a per-cpu variable found through kernel BTF; a
 *             kernel whose BTF lacks it, e.g. Debian 5.10, refuses every form
 *             and user space reads /proc/net/softnet_stat instead)
 *
 * Every backlog drop is counted once (bpftune counted each drop twice);
 * the decision to report is sampled and deduplicated.
 */
#include "pybpftune.bpf.h"

#define NET_RX_DROP 1
#define WINDOW_NS (60ULL * 1000 * 1000 * 1000)

/* Mirror of net.core.netdev_max_backlog, kept current by user space. */
__u64 max_backlog = 1000;
/* Backlog drops in the current window; user space zeroes both on a change. */
__u64 backlog_drops;
__u64 backlog_window_start;

struct bpftune_sample backlog_sample;
struct bpftune_sample squeeze_sample;

extern struct softnet_data softnet_data __ksym __weak;

/* Last time_squeeze seen per cpu, plus one (0: not looked yet). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} bpftune_squeeze SEC(".maps");

static __always_inline __u64 net_cookie_of(struct sk_buff *skb)
{
	struct net *net = NULL;

	if (skb)
		net = BPF_CORE_READ(skb, dev, nd_net.net);
	return net ? bpftune_netns_cookie(net) : BPFTUNE_NETNS_UNKNOWN;
}

static __always_inline int backlog_drop(struct sk_buff *skb, __u32 cpu)
{
	struct bpftune_event event = {};
	struct net_buffer_obs *o = (void *)event.raw_data;
	__u64 now, start, drops;

	/* Result unused: a plain atomic add, which 5.10 accepts (fetching
	 * atomics need 5.12). */
	__sync_fetch_and_add(&backlog_drops, 1);
	if (!bpftune_sample(&backlog_sample))
		return 0;
	drops = backlog_drops;
	now = bpf_ktime_get_ns();
	start = backlog_window_start;
	if (!start) {
		/* First look since user space opened a window (at start or
		 * after a change): the drops counted since then belong to it. */
		backlog_window_start = now;
		start = now;
	} else if (now - start > WINDOW_NS) {
		/* A new minute: only drops from now on count. */
		backlog_window_start = now;
		backlog_drops = 1;
		start = now;
		drops = 1;
	}
	/* bpftune's threshold: 1/32 of the backlog dropped within a minute. */
	if (drops < (max_backlog >> 5))
		return 0;
	o->cpu = cpu;
	o->drops = drops;
	o->window_ns = now - start;
	o->max_backlog = max_backlog;
	/* fentry/fexit programs must return 0 (6.1 verifier) */
	bpftune_send_observation(net_cookie_of(skb), NET_BUFFER_OBS_BACKLOG_DROPS,
					NET_BUFFER_MAX_BACKLOG, &event);
	return 0;
}

BPFTUNE_TP(backlog, kfree_skb, struct sk_buff *skb, void *location, enum skb_drop_reason reason)
{
	/* No exists-check on purpose: without this enum value the form must
	 * fail to load so the loader picks fexit/kretprobe instead. */
	if (reason != bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_CPU_BACKLOG))
		return 0;
	return backlog_drop(skb, bpf_get_smp_processor_id());
}

#ifndef BPFTUNE_LEGACY
SEC("fexit/enqueue_to_backlog")
int BPF_PROG(bpftune_backlog__fexit, struct sk_buff *skb, int cpu, unsigned int *qtail, int ret)
{
	if (ret != NET_RX_DROP)
		return 0;
	return backlog_drop(skb, cpu);
}
#endif

SEC("kretprobe/enqueue_to_backlog")
int BPF_KRETPROBE(bpftune_backlog__kretprobe, int ret)
{
	if (ret != NET_RX_DROP)
		return 0;
	return backlog_drop(NULL, bpf_get_smp_processor_id());
}

static __always_inline int squeeze_check(void)
{
	struct bpftune_event event = {};
	struct net_buffer_obs *o = (void *)event.raw_data;
	struct softnet_data *sd;
	__u64 *last, squeeze, prev;
	__u32 zero = 0;

	/* Refused at load when kernel BTF has no softnet_data variable. */
	sd = bpf_this_cpu_ptr(&softnet_data);
	squeeze = BPF_CORE_READ(sd, time_squeeze);
	last = bpf_map_lookup_elem(&bpftune_squeeze, &zero);
	if (!last)
		return 0;
	prev = *last;
	*last = squeeze + 1;
	if (!prev || squeeze + 1 <= prev)
		return 0;
	o->cpu = bpf_get_smp_processor_id();
	o->time_squeeze = squeeze;
	o->prev_time_squeeze = prev - 1;
	/* fentry/fexit programs must return 0 (6.1 verifier) */
	bpftune_send_observation(0, NET_BUFFER_OBS_TIME_SQUEEZE, NET_BUFFER_BUDGET, &event);
	return 0;
}

BPFTUNE_TP(squeeze, napi_poll, struct napi_struct *napi, int work, int budget)
{
	if (work <= 0 || !bpftune_sample(&squeeze_sample))
		return 0;
	return squeeze_check();
}

#ifndef BPFTUNE_LEGACY
SEC("fentry/napi_complete_done")
int BPF_PROG(bpftune_squeeze__fentry, struct napi_struct *n, int work_done)
{
	if (work_done <= 0 || !bpftune_sample(&squeeze_sample))
		return 0;
	return squeeze_check();
}
#endif

SEC("kprobe/napi_complete_done")
int BPF_KPROBE(bpftune_squeeze__kprobe, struct napi_struct *n, int work_done)
{
	if (work_done <= 0 || !bpftune_sample(&squeeze_sample))
		return 0;
	return squeeze_check();
}
