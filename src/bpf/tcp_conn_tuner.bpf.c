/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * tcp_conn tuner: pick the congestion control of each TCP connection.
 *
 * One sockops program (bpftune_conn_tuner) on the root cgroup v2 sees every TCP
 * connection of the machine, in every network namespace:
 *
 *  - at establishment it counts the remote host (namespace + address) and,
 *    once the host was seen TCP_CONN_MIN_INSTANCES times, chooses the
 *    algorithm with the lowest learned cost (tcp_conn_cost.h), exploring a
 *    random one with probability 1/TCP_CONN_EPSILON;
 *  - on each retransmission it checks the loss rule: more retransmits than
 *    1/64 of the segments sent switches the connection to BBR (once);
 *  - when the connection starts closing (FIN_WAIT1 / CLOSE_WAIT) it scores
 *    the algorithm the connection ran: cost from its min RTT and delivery
 *    rate against the host's best, folded into a moving average.
 *
 * Choices are made with bpf_setsockopt(TCP_CONGESTION) and counted in
 * bpftune_counts; user space reads the counts and host table at exit, and gets
 * one event per (namespace, reason, algorithm) per second for its log.
 */
#include "pybpftune.bpf.h"
#include <bpf/bpf_endian.h>
#include "tcp_conn_cost.h"

#define AF_INET 2
#define AF_INET6 10
#define SOL_TCP 6
#define TCP_CONGESTION 13
#define TCP_THIN_LINEAR_TIMEOUTS 16
#define TCP_CA_NAME_MAX 16

/* A context load the compiler may neither move nor merge with another. */
#define CTX_READ(field)                                                        \
	({                                                                     \
		__u32 __v = (field);                                           \
		asm volatile("" : "+r"(__v));                                  \
		__v;                                                           \
	})

#define TCP_CONN_EVENT_INTERVAL_NS (1000ULL * 1000 * 1000)

/* Set by user space: which algorithms exist here (bit per enum tcp_conn_alg). */
__u32 conn_algs_available = (1U << TCP_CONN_ALG_CUBIC) | (1U << TCP_CONN_ALG_BBR);
/* Global tcp_thin_linear_timeouts (per-socket opt-in is skipped when it is on). */
__u32 conn_thin_lto_sysctl;
/* 0 turns the RL choice off (loss rule only). */
__u32 conn_rl_enabled = 1;
/* Advice mode (--advise): decide and report every choice, set nothing. */
__u32 conn_advise_only;

static const char alg_names[TCP_CONN_NUM_ALGS][TCP_CA_NAME_MAX] = {
	"cubic", "bbr", "htcp", "dctcp",
};

/* Per connection: what it runs and what we did to it. */
struct conn_sk {
	__u8 alg;	/* enum tcp_conn_alg, or TCP_CONN_ALG_OTHER */
	__u8 switched;	/* the loss rule already fired */
	__u8 chosen;	/* the RL choice set the algorithm */
	__u8 scored;
	__u32 pad;
	__u64 netns_cookie;
	struct tcp_conn_host_key host;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct conn_sk);
} bpftune_conn_sk SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct tcp_conn_host_key);
	__type(value, struct tcp_conn_host);
} bpftune_hosts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tcp_conn_counts);
} bpftune_counts SEC(".maps");

/* Namespaces where an administrator took over (cookie -> 1), set by user space. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct tcp_conn_ns_key);
	__type(value, __u8);
} bpftune_ns_off SEC(".maps");

/* Scratch space for an event (too big for the BPF stack next to the rest). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bpftune_event);
} bpftune_scratch SEC(".maps");

/* A host's first entry. */
const struct tcp_conn_host conn_new_host = {};

static __always_inline struct tcp_conn_counts *counts(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&bpftune_counts, &zero);
}

/*
 * Namespace of the connection.  Sockops programs may not use probe reads on
 * every kernel, so walk the BTF-typed socket with plain (CO-RE) loads.
 */
static __always_inline __u64 conn_netns_cookie(struct bpf_sock *bsk)
{
	struct tcp_sock *tp;
	struct net *net;

	if (!bsk)
		return BPFTUNE_NETNS_UNKNOWN;
	tp = bpf_skc_to_tcp_sock(bsk);
	if (!tp)
		return BPFTUNE_NETNS_UNKNOWN;
	net = tp->inet_conn.icsk_inet.sk.__sk_common.skc_net.net;
	if (!net)
		return BPFTUNE_NETNS_UNKNOWN;
	if (bpftune_netns_cookie_supported && bpf_core_field_exists(net->net_cookie))
		return net->net_cookie;
	if (net->ns.inum == bpftune_init_netns_inum)
		return 0;
	return BPFTUNE_NETNS_UNKNOWN;
}

static __always_inline void conn_host_key(struct bpf_sock_ops *ops, __u64 cookie, struct tcp_conn_host_key *key)
{
	/* Read every field unconditionally: the verifier refuses context loads
	 * through a pointer the compiler computed from a branch. */
	__u32 family = CTX_READ(ops->family), ip4 = CTX_READ(ops->remote_ip4);
	__u32 ip6_0 = CTX_READ(ops->remote_ip6[0]), ip6_1 = CTX_READ(ops->remote_ip6[1]);
	__u32 ip6_2 = CTX_READ(ops->remote_ip6[2]), ip6_3 = CTX_READ(ops->remote_ip6[3]);
	__u32 *a = (__u32 *)key->addr;

	key->netns_cookie = cookie;
	if (family == AF_INET6) {
		a[0] = ip6_0;
		a[1] = ip6_1;
		a[2] = ip6_2;
		a[3] = ip6_3;
	} else {
		a[0] = 0;
		a[1] = 0;
		a[2] = bpf_htonl(0xffff);
		a[3] = ip4;
	}
}

static __always_inline __u32 conn_current_alg(struct bpf_sock_ops *ops)
{
	char name[TCP_CA_NAME_MAX] = {};
	int i, j;

	if (bpf_getsockopt(ops, SOL_TCP, TCP_CONGESTION, name, sizeof(name)))
		return TCP_CONN_ALG_OTHER;
	for (i = 0; i < TCP_CONN_NUM_ALGS; i++) {
		for (j = 0; j < TCP_CA_NAME_MAX; j++) {
			if (name[j] != alg_names[i][j])
				break;
			if (!name[j])
				return i;
		}
	}
	return TCP_CONN_ALG_OTHER;
}

static __always_inline void conn_event(struct bpf_sock_ops *ops, struct conn_sk *c, __u32 reason, __u32 old_alg,
				       __u32 new_alg, __u64 cost)
{
	__u64 now = bpf_ktime_get_ns(), key, *last;
	struct bpftune_event *event;
	struct tcp_conn_event *e;
	__u32 zero = 0;

	/* At most one event a second per (namespace, reason, algorithm). */
	key = (c->netns_cookie & 0xffffffffffffULL) | ((__u64)reason << 56) | ((__u64)new_alg << 48);
	last = bpf_map_lookup_elem(&bpftune_last_ev, &key);
	if (last && now - *last < TCP_CONN_EVENT_INTERVAL_NS)
		return;
	bpf_map_update_elem(&bpftune_last_ev, &key, &now, BPF_ANY);

	event = bpf_map_lookup_elem(&bpftune_scratch, &zero);
	if (!event)
		return;
	__builtin_memset(event, 0, sizeof(*event));
	e = (struct tcp_conn_event *)event->raw_data;
	event->scenario_id = reason == TCP_CONN_REASON_LOSS ? TCP_CONN_SCENARIO_LOSS : TCP_CONN_SCENARIO_SPECIFY;
	event->netns_cookie = c->netns_cookie;
	e->reason = reason;
	e->old_alg = old_alg;
	e->new_alg = new_alg;
	e->family = ops->family;
	e->total_retrans = ops->total_retrans;
	e->segs_out = ops->segs_out;
	e->cost = cost;
	__builtin_memcpy(e->addr, c->host.addr, sizeof(e->addr));
	/* Not bpftune_send_event(): sockops programs may not ask for the
	 * current pid before Linux 6.x, and the task is arbitrary here anyway. */
	event->tuner_id = tuner_id;
	event->pid = 0;
	if (bpf_ringbuf_output(&bpftune_ringbuf, event, sizeof(*event), 0))
		__sync_fetch_and_add(&bpftune_ringbuf_drops, 1);
	else
		__sync_fetch_and_add(&bpftune_events_sent, 1);
}

static __always_inline int conn_set(struct bpf_sock_ops *ops, struct conn_sk *c, __u32 alg, __u32 reason,
				    __u64 cost)
{
	struct tcp_conn_counts *n = counts();
	char name[TCP_CA_NAME_MAX];
	__u32 old = c->alg;

	if (alg >= TCP_CONN_NUM_ALGS || reason >= TCP_CONN_NUM_REASONS)
		return -1;
	__builtin_memcpy(name, alg_names[alg], sizeof(name));
	if (conn_advise_only) {
		/* The connection keeps its algorithm; the event is the advice. */
		conn_event(ops, c, reason, old, alg, cost);
		return 0;
	}
	if (bpf_setsockopt(ops, SOL_TCP, TCP_CONGESTION, name, sizeof(name))) {
		if (n)
			__sync_fetch_and_add(&n->setsockopt_failed, 1);
		return -1;
	}
	c->alg = alg;
	if (n)
		__sync_fetch_and_add(&n->chosen[reason][alg], 1);
	conn_event(ops, c, reason, old, alg, cost);
	return 0;
}

static __always_inline void conn_established(struct bpf_sock_ops *ops, struct bpf_sock *sk)
{
	struct tcp_conn_counts *n = counts();
	struct tcp_conn_host *h;
	__u64 metric[TCP_CONN_NUM_ALGS], samples[TCP_CONN_NUM_ALGS];
	__u32 pick, reason, r, i;
	struct tcp_conn_ns_key ns_key = {};
	struct conn_sk *c;
	__u64 cookie;

	cookie = conn_netns_cookie(sk);
	if (n)
		__sync_fetch_and_add(&n->connections, 1);
	ns_key.netns_cookie = cookie;
	if (bpf_map_lookup_elem(&bpftune_ns_off, &ns_key)) {
		if (n)
			__sync_fetch_and_add(&n->skipped_netns, 1);
		return;
	}
	c = bpf_sk_storage_get(&bpftune_conn_sk, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!c)
		return;
	c->netns_cookie = cookie;
	c->alg = conn_current_alg(ops);
	conn_host_key(ops, cookie, &c->host);
	bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RETRANS_CB_FLAG);

	h = bpf_map_lookup_elem(&bpftune_hosts, &c->host);
	if (!h) {
		bpf_map_update_elem(&bpftune_hosts, &c->host, &conn_new_host, BPF_NOEXIST);
		h = bpf_map_lookup_elem(&bpftune_hosts, &c->host);
		if (!h)
			return;
	}
	__sync_fetch_and_add(&h->instances, 1);
	if (!conn_rl_enabled || h->instances < TCP_CONN_MIN_INSTANCES)
		return;

	r = bpf_get_prandom_u32();
	for (i = 0; i < TCP_CONN_NUM_ALGS; i++) {
		metric[i] = h->alg[i].metric;
		samples[i] = h->alg[i].samples;
	}
	if (r % TCP_CONN_EPSILON == 0) {
		/* Explore: a random available algorithm, lowest cost ignored. */
		__u64 zero[TCP_CONN_NUM_ALGS] = {};

		pick = tcp_conn_pick(zero, zero, conn_algs_available, (r >> 8) % TCP_CONN_NUM_ALGS);
		reason = TCP_CONN_REASON_EXPLORE;
	} else {
		pick = tcp_conn_pick(metric, samples, conn_algs_available, (r >> 8) % TCP_CONN_NUM_ALGS);
		reason = TCP_CONN_REASON_GREEDY;
	}
	if (pick >= TCP_CONN_NUM_ALGS)
		return;
	if (pick == c->alg) {
		/* Already running it: still a choice, but no setsockopt needed. */
		if (n)
			__sync_fetch_and_add(&n->chosen[reason][pick], 1);
	} else if (conn_set(ops, c, pick, reason, samples[pick] ? metric[pick] : 0)) {
		return;
	}
	c->chosen = 1;
	__sync_fetch_and_add(&h->alg[pick].chosen, 1);
	if (reason == TCP_CONN_REASON_GREEDY)
		__sync_fetch_and_add(&h->alg[pick].greedy, 1);
}

static __always_inline void conn_retrans(struct bpf_sock_ops *ops, struct bpf_sock *sk)
{
	struct tcp_conn_counts *n;
	struct conn_sk *c;
	int one = 1;

	/* The loss rule: more than 1/64 (~1.5 %) of the segments sent were
	 * retransmitted, and more than one segment: a lone tail-loss probe or
	 * spurious timeout early in a connection is not a loss rate. */
	if (ops->total_retrans < TCP_CONN_MIN_RETRANS || ops->total_retrans <= (ops->segs_out >> TCP_CONN_LOSS_SHIFT))
		return;
	c = bpf_sk_storage_get(&bpftune_conn_sk, sk, 0, 0);
	if (!c || c->switched)
		return;
	c->switched = 1;
	bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_STATE_CB_FLAG);
	if (c->alg == TCP_CONN_ALG_BBR || !(conn_algs_available & (1U << TCP_CONN_ALG_BBR)))
		return;
	if (!conn_thin_lto_sysctl && !conn_advise_only &&
	    !bpf_setsockopt(ops, SOL_TCP, TCP_THIN_LINEAR_TIMEOUTS, &one, sizeof(one))) {
		n = counts();
		if (n)
			__sync_fetch_and_add(&n->thin_lto, 1);
	}
	conn_set(ops, c, TCP_CONN_ALG_BBR, TCP_CONN_REASON_LOSS, 0);
}

static __always_inline void conn_closing(struct bpf_sock_ops *ops, struct bpf_sock *sk)
{
	struct tcp_conn_counts *n;
	struct tcp_conn_host *h;
	struct conn_sk *c;
	__u64 rtt, rate, cost;
	__u32 alg;

	c = bpf_sk_storage_get(&bpftune_conn_sk, sk, 0, 0);
	if (!c || c->scored || c->alg >= TCP_CONN_NUM_ALGS)
		return;
	c->scored = 1;
	rtt = ops->rtt_min;
	rate = tcp_conn_delivery_rate(ops->rate_delivered, ops->mss_cache, ops->rate_interval_us);
	if (!rtt || !rate)
		return;
	h = bpf_map_lookup_elem(&bpftune_hosts, &c->host);
	if (!h)
		return;
	alg = c->alg;
	if (!h->min_rtt_us || rtt < h->min_rtt_us)
		h->min_rtt_us = rtt;
	if (rate > h->max_rate)
		h->max_rate = rate;
	if (alg >= TCP_CONN_NUM_ALGS)
		return;
	if (!h->alg[alg].min_rtt_us || rtt < h->alg[alg].min_rtt_us)
		h->alg[alg].min_rtt_us = rtt;
	if (rate > h->alg[alg].max_rate)
		h->alg[alg].max_rate = rate;
	cost = tcp_conn_cost(rtt, h->min_rtt_us, rate, h->max_rate);
	h->alg[alg].metric = tcp_conn_rl_update(h->alg[alg].metric, h->alg[alg].samples, cost, bpftune_shift());
	__sync_fetch_and_add(&h->alg[alg].samples, 1);
	n = counts();
	if (n)
		__sync_fetch_and_add(&n->measured, 1);
}

SEC("sockops")
int bpftune_conn_tuner(struct bpf_sock_ops *ops)
{
	struct bpf_sock *sk = ops->sk;

	if (!sk)
		return 1;
	switch (ops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		conn_established(ops, sk);
		break;
	case BPF_SOCK_OPS_RETRANS_CB:
		conn_retrans(ops, sk);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (ops->args[1] == BPF_TCP_FIN_WAIT1 || ops->args[1] == BPF_TCP_CLOSE_WAIT)
			conn_closing(ops, sk);
		break;
	}
	return 1;
}
