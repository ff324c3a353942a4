/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * BPF-side framework shared by every pybpftune object: the maps all tuners
 * share, the globals the loader sets before load, event output, adaptive
 * sampling and the learning-rate arithmetic.
 *
 * Names: every program and map is named "bpftune_..." so that operators can
 * tell ours apart in `bpftool prog` / `bpftool map` (the kernel keeps the
 * first 15 characters; bpftool prints a program's full name from its BTF).
 *
 * Multi-form signals: one kernel signal may be written in several forms, each
 * a program named "bpftune_<signal>__<form>" (e.g. bpftune_rcv_space__tp_btf,
 * bpftune_rcv_space__fentry, bpftune_rcv_space__kprobe).  The loader keeps the
 * best form that loads and attaches on the running kernel and switches the
 * others off.  Programs without "__" in their name are single-form and
 * required.
 *
 * Variants: the full variant (default) may use tp_btf, fentry/fexit and
 * iterators; the legacy variant (-DBPFTUNE_LEGACY) uses only raw tracepoints,
 * kprobes, cgroup and sockops programs.  BPFTUNE_TP() and BPFTUNE_FUNC() pick
 * the right section per variant.
 */
#ifndef PYBPFTUNE_BPF_H
#define PYBPFTUNE_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "bpftune_shared.h"

#ifndef BPFTUNE_RINGBUF_SIZE
#define BPFTUNE_RINGBUF_SIZE (256 * 1024)
#endif

/* Shared by every object: the loader reuses the first object's fds. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, BPFTUNE_RINGBUF_SIZE);
} bpftune_ringbuf SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct corr_key);
	__type(value, struct corr);
} bpftune_corr SEC(".maps");

/*
 * Per object: last time an event was sent for (netns, tunable), for dedupe.
 * LRU, because keys of namespaces that are gone are never deleted: a full
 * plain hash would refuse new keys and with them the rate limit.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096); /* recent keys suffice; the map is preallocated */
	__type(key, __u64);
	__type(value, __u64);
} bpftune_last_ev SEC(".maps");

/* Globals set by the loader before load; writable afterwards via mmap. */
__u32 tuner_id;
__s32 bpftune_pid;
__u32 bpftune_learning_rate = 4;
__u32 bpftune_debug;
__u32 bpftune_sample_rate = 4;
__u32 bpftune_netns_cookie_supported;
__u64 bpftune_init_netns_inum;
/* Counted by the BPF side, read by user space. */
__u64 bpftune_ringbuf_drops;
__u64 bpftune_events_sent;

/* Minimum spacing of identical (netns, tunable) events. */
#define BPFTUNE_EVENT_INTERVAL_NS (25ULL * 1000 * 1000)

#ifdef BPFTUNE_LEGACY
#define BPFTUNE_TP_SEC(tp) SEC("raw_tp/" #tp)
#define BPFTUNE_TP_FORM raw_tp
#define BPFTUNE_FUNC_SEC(fn) SEC("kprobe/" #fn)
#else
#define BPFTUNE_TP_SEC(tp) SEC("tp_btf/" #tp)
#define BPFTUNE_TP_FORM tp_btf
#define BPFTUNE_FUNC_SEC(fn) SEC("fentry/" #fn)
#endif

#define ___bpftune_cat(a, b) bpftune_##a##__##b
#define __bpftune_cat(a, b) ___bpftune_cat(a, b)

/*
 * BPFTUNE_TP(signal, tracepoint, args...): the tracepoint form of a signal,
 * tp_btf in the full variant and raw_tp in the legacy one; both read typed
 * arguments the same way through BPF_PROG.
 */
#define __bpftune_prog(name, args...) BPF_PROG(name, ##args)
#define BPFTUNE_TP(signal, tp, args...)                                        \
	BPFTUNE_TP_SEC(tp)                                                     \
	int __bpftune_prog(__bpftune_cat(signal, BPFTUNE_TP_FORM), ##args)

/* The fentry form of a signal (full variant only). */
#define BPFTUNE_FENTRY(signal, fn, args...)                                    \
	SEC("fentry/" #fn) int BPF_PROG(bpftune_##signal##__fentry, ##args)

/* The kprobe form of a signal (both variants). */
#define BPFTUNE_KPROBE(signal, fn, args...)                                    \
	SEC("kprobe/" #fn) int BPF_KPROBE(bpftune_##signal##__kprobe, ##args)

#define bpftune_log(fmt, ...)                                                  \
	do {                                                                   \
		if (bpftune_debug)                                             \
			bpf_printk(fmt, ##__VA_ARGS__);                        \
	} while (0)

/* Learning-rate arithmetic: shift = 6 - min(rate, 4). */
static __always_inline __u32 bpftune_shift(void)
{
	__u32 rate = bpftune_learning_rate;

	return 6 - (rate > 4 ? 4 : rate);
}

#define BPFTUNE_GROW(v) ((v) + ((v) >> bpftune_shift()))
#define BPFTUNE_SHRINK(v) ((v) - ((v) >> bpftune_shift()))
#define BPFTUNE_NEARLY_FULL(v, lim)                                            \
	((v) >= (lim) || (v) + ((lim) >> bpftune_shift()) >= (lim))
#define BPFTUNE_NEARLY_EMPTY(v, lim) ((v) <= ((lim) >> bpftune_shift()))

/*
 * Adaptive sampling: only every rate-th call passes; when two passing calls
 * are closer than 10 ms the rate doubles, otherwise it halves back towards the
 * configured base rate.  Returns true when this call should do the work.
 */
static __always_inline bool bpftune_sample(struct bpftune_sample *s)
{
	__u64 now, rate = s->rate;

	if (rate < bpftune_sample_rate)
		rate = bpftune_sample_rate ? bpftune_sample_rate : 1;
	s->count++;
	if (s->count % rate)
		return false;
	now = bpf_ktime_get_ns();
	if (now - s->ts < 10 * 1000 * 1000ULL) {
		if (rate < (1ULL << 20))
			rate <<= 1;
	} else if (rate > bpftune_sample_rate) {
		rate >>= 1;
	}
	s->rate = rate;
	s->ts = now;
	return true;
}

/*
 * Cookie of a network namespace: the kernel's net_cookie when user space can
 * map cookies (SO_NETNS_COOKIE), else 0 for the initial namespace, recognised
 * by its inode number, and "unknown" for any other.
 */
static __always_inline __u64 bpftune_netns_cookie(struct net *net)
{
	if (!net)
		return BPFTUNE_NETNS_UNKNOWN;
	if (bpftune_netns_cookie_supported &&
	    bpf_core_field_exists(net->net_cookie))
		return BPF_CORE_READ(net, net_cookie);
	if (BPF_CORE_READ(net, ns.inum) == bpftune_init_netns_inum)
		return 0;
	return BPFTUNE_NETNS_UNKNOWN;
}

static __always_inline struct net *bpftune_sock_net(struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_net.net);
}

/* Fill the header and hand the event to user space; counts drops. */
static __always_inline int bpftune_send_event(struct bpftune_event *event)
{
	event->tuner_id = tuner_id;
	event->pid = bpf_get_current_pid_tgid() >> 32;
	if (bpf_ringbuf_output(&bpftune_ringbuf, event, sizeof(*event), 0)) {
		__sync_fetch_and_add(&bpftune_ringbuf_drops, 1);
		return -1;
	}
	__sync_fetch_and_add(&bpftune_events_sent, 1);
	return 0;
}

/*
 * Propose new values for a sysctl tunable in a namespace.  Identical
 * (namespace, tunable) proposals closer than 25 ms are dropped here, so a busy
 * hook cannot flood the ring buffer.
 */
static __always_inline int bpftune_send_sysctl_event(struct net *net,
						     __u32 scenario,
						     __u32 tunable,
						     const __s64 *old,
						     const __s64 *new,
						     struct bpftune_event *event)
{
	__u64 cookie = bpftune_netns_cookie(net);
	__u64 now = bpf_ktime_get_ns();
	__u64 key, *last;
	int i;

	if (cookie == BPFTUNE_NETNS_UNKNOWN)
		return 0;
	key = (cookie & 0xffffffffULL) | ((__u64)tunable << 32);
	last = bpf_map_lookup_elem(&bpftune_last_ev, &key);
	if (last && now - *last < BPFTUNE_EVENT_INTERVAL_NS)
		return 0;
	bpf_map_update_elem(&bpftune_last_ev, &key, &now, BPF_ANY);

	event->scenario_id = scenario;
	event->netns_cookie = cookie;
	event->update[0].id = tunable;
	for (i = 0; i < BPFTUNE_MAX_VALUES; i++) {
		event->update[0].old[i] = old[i];
		event->update[0].new[i] = new[i];
	}
	return bpftune_send_event(event);
}

/*
 * Send an observation whose payload the caller wrote into event->raw_data
 * (a struct from bpftune_shared.h), for user space's rules to judge.
 * Identical (namespace, key) observations closer than 25 ms are dropped.
 * Unlike bpftune_send_sysctl_event it also sends events from namespaces
 * whose cookie is unknown (BPFTUNE_NETNS_UNKNOWN): a tuner of global sysctls
 * still cares about them.
 */
static __always_inline int bpftune_send_observation(__u64 cookie, __u32 scenario,
						    __u32 key,
						    struct bpftune_event *event)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 k, *last;

	k = (cookie & 0xffffffffULL) | ((__u64)key << 32) | (1ULL << 63);
	last = bpf_map_lookup_elem(&bpftune_last_ev, &k);
	if (last && now - *last < BPFTUNE_EVENT_INTERVAL_NS)
		return 0;
	bpf_map_update_elem(&bpftune_last_ev, &k, &now, BPF_ANY);
	event->scenario_id = scenario;
	event->netns_cookie = cookie;
	return bpftune_send_event(event);
}

/* Add one (x, y) sample to the shared correlation sums of a tunable. */
static __always_inline void bpftune_corr_update(__u32 id, __u64 cookie, __u64 x,
						__u64 y)
{
	struct corr_key key = { .tuner_id = tuner_id, .id = id, .netns_cookie = cookie };
	struct corr zero = {}, *c;

	c = bpf_map_lookup_elem(&bpftune_corr, &key);
	if (!c) {
		bpf_map_update_elem(&bpftune_corr, &key, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&bpftune_corr, &key);
		if (!c)
			return;
	}
	/* Restart the sums rather than let them overflow. */
	if (c->n > (1ULL << 30) || c->sum_x_sq > (1ULL << 62) || c->sum_y_sq > (1ULL << 62) ||
	    c->sum_xy > (1ULL << 62)) {
		__builtin_memset(c, 0, sizeof(*c));
	}
	c->n++;
	c->sum_x += x;
	c->sum_x_sq += x * x;
	c->sum_y += y;
	c->sum_y_sq += y * y;
	c->sum_xy += x * y;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#endif /* PYBPFTUNE_BPF_H */
