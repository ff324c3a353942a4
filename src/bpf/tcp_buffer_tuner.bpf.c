/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * tcp_buffer tuner: TCP socket buffer limits, TCP memory and the SYN backlog.
 *
 * Signals and their forms (best first; the loader keeps the first that works):
 *   rcv_space    receive buffer pressing tcp_rmem[2] or capped by the window
 *                scale: tracepoint tcp:tcp_rcv_space_adjust | fentry | kprobe
 *                on tcp_rcv_space_adjust.                          (sampled)
 *   snd_buf      send side limited by tcp_wmem[2]: tracepoint tcp:tcp_probe
 *                (an ACK reaches a socket the kernel marks sndbuf-limited) |
 *                fentry | kprobe on tcp_sndbuf_expand.              (sampled)
 *   conn_state   connections reaching ESTABLISHED (counted per namespace for
 *                the SYN-backlog correlation) and a TCP memory check:
 *                tracepoint sock:inet_sock_set_state.               (sampled)
 *   mem_limit    an allocation refused over tcp_mem: tracepoint
 *                sock:sock_exceed_buf_limit.                        (sampled)
 *   mem_pressure TCP entering memory pressure: fentry | kprobe on
 *                tcp_enter_memory_pressure.                       (optional)
 *   syn_flood    a SYN reaching a full listen queue: fentry | kprobe on
 *                tcp_conn_request.                      (optional, sampled)
 *
 * Every buffer and memory proposal goes to user space, which decides the
 * size of the step (toward what the connection needs, see tuners/tcp_buffer/).
 */
#include "pybpftune.bpf.h"

#define SOCK_SNDBUF_LOCK_MASK 1
#define SOCK_RCVBUF_LOCK_MASK 2
#define TCP_ESTABLISHED_STATE 1
#define TCP_CHRONO_SNDBUF 3
#define SOCK_NOSPACE_BIT 2
#define IPPROTO_TCP_NUM 6
#define INT_MAX_VALUE 2147483647LL

/* Set by user space: Σ(managed − high) of the Normal zones (or DMA32). */
__u64 nr_free_buffer_pages;
/* Memory state as last seen here; user space reads it. */
__u32 near_memory_pressure;
__u32 near_memory_exhaustion;

/* Adaptive sampling state of each hot hook (reported at exit). */
struct bpftune_sample rcv_space_sample;
struct bpftune_sample snd_buf_sample;
struct bpftune_sample conn_state_sample;
struct bpftune_sample mem_limit_sample;
struct bpftune_sample syn_flood_sample;

/* Per namespace: SYN-flood hits and established connections. */
struct tcp_buffer_syn_stats {
	__u64 syn_floods;
	__u64 established;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct tcp_buffer_syn_stats);
} bpftune_synstat SEC(".maps");

/* Hold-offs user space sets once a limit suffices (struct tcp_buffer_hold). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct tcp_buffer_hold_key);
	__type(value, struct tcp_buffer_hold);
} bpftune_hold SEC(".maps");

static __always_inline bool hold_applies(struct tcp_buffer_hold_key *key, __s64 limit, __u64 metric, __u64 now)
{
	struct tcp_buffer_hold *h = bpf_map_lookup_elem(&bpftune_hold, key);

	return h && h->limit == limit && metric <= h->metric && now < h->until_ns;
}

/*
 * User space judged the limit sufficient for this connection (while it
 * shows no more than hold->metric), or holds the whole namespace while its
 * connections grow into a new limit, and the limit has not changed since:
 * no event (and no correlation sample, whose x would not move).
 */
static __always_inline bool held(struct net *net, __u32 tunable, __s64 limit, __u64 metric, __u32 conn)
{
	struct tcp_buffer_hold_key key = {};
	__u64 now = bpf_ktime_get_ns();

	key.netns_cookie = bpftune_netns_cookie(net);
	key.tunable = tunable;
	if (hold_applies(&key, limit, metric, now))
		return true;
	if (!conn)
		return false;
	key.conn = conn;
	return hold_applies(&key, limit, metric, now);
}

/* One event buffer per CPU keeps the 248-byte event off the BPF stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bpftune_event);
} bpftune_scratch SEC(".maps");

static __always_inline struct bpftune_event *scratch_event(void)
{
	__u32 zero = 0;
	struct bpftune_event *ev = bpf_map_lookup_elem(&bpftune_scratch, &zero);

	if (ev)
		__builtin_memset(ev, 0, sizeof(*ev));
	return ev;
}

static __always_inline __s64 grow_capped(__s64 v)
{
	__s64 g = BPFTUNE_GROW(v);

	return g > INT_MAX_VALUE ? INT_MAX_VALUE : g;
}

/*
 * tcp_mem check (bpftune's tcp_nearly_out_of_memory): compare TCP's
 * allocated pages with tcp_mem and propose growth capped by free buffer
 * pages F: tcp_mem[0] < F/16, tcp_mem[1] < F/8, tcp_mem[2] <= F/4.
 * Returns true when memory is short (buffer growth must wait).
 */
static __always_inline bool check_memory(struct sock *sk)
{
	struct bpftune_event *ev;
	struct proto *prot = BPF_CORE_READ(sk, __sk_common.skc_prot);
	long *limits;
	atomic_long_t *alloc_ptr;
	long mem[3] = {}, allocated = 0;
	__s64 old[3], new[3];
	__u64 f = nr_free_buffer_pages;
	__u32 scenario;
	int i;

	if (!prot)
		return false;
	limits = BPF_CORE_READ(prot, sysctl_mem);
	alloc_ptr = BPF_CORE_READ(prot, memory_allocated);
	if (!limits || !alloc_ptr)
		return false;
	if (bpf_probe_read_kernel(mem, sizeof(mem), limits))
		return false;
	allocated = BPF_CORE_READ(alloc_ptr, counter);
	if (allocated < 0)
		allocated = 0;
	for (i = 0; i < 3; i++) {
		old[i] = mem[i];
		new[i] = mem[i];
	}
	if (BPFTUNE_NEARLY_FULL(allocated, mem[2])) {
		near_memory_exhaustion = 1;
		near_memory_pressure = 1;
		scenario = TCP_BUFFER_MEM_EXHAUSTION;
		new[2] = BPFTUNE_GROW(mem[2]);
		if (f && new[2] > (__s64)(f >> 2))
			new[2] = f >> 2;
	} else if (BPFTUNE_NEARLY_FULL(allocated, mem[1])) {
		near_memory_exhaustion = 0;
		near_memory_pressure = 1;
		scenario = TCP_BUFFER_MEM_PRESSURE;
		if (!f || mem[0] < (__s64)(f >> 4))
			new[0] = BPFTUNE_GROW(mem[0]);
		if (!f || mem[1] < (__s64)(f >> 3))
			new[1] = BPFTUNE_GROW(mem[1]);
		new[2] = BPFTUNE_GROW(mem[2]);
		if (f && new[2] > (__s64)(f >> 2))
			new[2] = f >> 2;
	} else {
		near_memory_exhaustion = 0;
		near_memory_pressure = 0;
		return false;
	}
	ev = scratch_event();
	if (ev)
		bpftune_send_sysctl_event(bpftune_sock_net(sk), scenario, TCP_BUFFER_TCP_MEM, old, new, ev);
	return true;
}

static __always_inline __u32 min_rtt_us(struct tcp_sock *tp)
{
	__u32 v = BPF_CORE_READ(tp, rtt_min.s[0].v);

	return v == ~0U ? 0 : v;
}

/*
 * Receive side: the socket's buffer has reached tcp_rmem[2] (the kernel's
 * receive autotuning can grow no further), or its window is capped by the
 * window scale chosen at the handshake from the limits then in force.
 */
static __always_inline int on_rcv(struct sock *sk)
{
	struct tcp_sock *tp = (struct tcp_sock *)sk;
	struct tcp_buffer_conn *c;
	struct bpftune_event *ev;
	struct net *net;
	__s64 old[3], new[3];
	__u32 locks, rcvbuf, window, space, cap, ws, flags = TCP_BUFFER_F_RCV;
	__u32 rtt;
	__u64 cookie;

	if (!sk)
		return 0;
	locks = BPF_CORE_READ_BITFIELD_PROBED(sk, sk_userlocks);
	if (locks & SOCK_RCVBUF_LOCK_MASK)
		return 0;
	net = bpftune_sock_net(sk);
	old[0] = BPF_CORE_READ(net, ipv4.sysctl_tcp_rmem[0]);
	old[1] = BPF_CORE_READ(net, ipv4.sysctl_tcp_rmem[1]);
	old[2] = BPF_CORE_READ(net, ipv4.sysctl_tcp_rmem[2]);
	rcvbuf = BPF_CORE_READ(sk, sk_rcvbuf);
	window = BPF_CORE_READ(tp, window_clamp);
	space = BPF_CORE_READ(tp, rcvq_space.space);
	if (BPF_CORE_READ_BITFIELD_PROBED(tp, rx_opt.wscale_ok)) {
		ws = BPF_CORE_READ_BITFIELD_PROBED(tp, rx_opt.rcv_wscale);
		cap = 65535U << (ws & 15);
	} else {
		cap = 65535;
	}
	if (BPFTUNE_NEARLY_FULL((__s64)rcvbuf, old[2]))
		flags |= TCP_BUFFER_F_LIMIT;
	/* The buffer allows more than the scale can say, and the reader
	 * consumes at least three quarters of the capped window per RTT. */
	if (window > cap && space + (cap >> 2) >= cap)
		flags |= TCP_BUFFER_F_WSCALE;
	if (!(flags & (TCP_BUFFER_F_LIMIT | TCP_BUFFER_F_WSCALE)))
		return 0;
	if (old[2] >= INT_MAX_VALUE)
		return 0;
	if (check_memory(sk))
		return 0;
	if (held(net, TCP_BUFFER_TCP_RMEM, old[2], space, BPF_CORE_READ(sk, __sk_common.skc_hash)))
		return 0;
	ev = scratch_event();
	if (!ev)
		return 0;
	rtt = BPF_CORE_READ(tp, rcv_rtt_est.rtt_us) >> 3;
	if (!rtt)
		rtt = BPF_CORE_READ(tp, srtt_us) >> 3;
	c = (struct tcp_buffer_conn *)&ev->update[1];
	c->flags = flags;
	c->rtt_us = rtt;
	c->min_rtt_us = min_rtt_us(tp);
	c->mss = BPF_CORE_READ(tp, advmss);
	c->buf = rcvbuf;
	c->window = window;
	c->window_cap = cap;
	c->delivered = space;
	c->interval_us = rtt;
	c->conn = BPF_CORE_READ(sk, __sk_common.skc_hash);
	c->bytes = BPF_CORE_READ(tp, bytes_received);
	c->ts_ns = bpf_ktime_get_ns();
	new[0] = old[0];
	new[1] = old[1];
	new[2] = grow_capped(old[2]);
	cookie = bpftune_netns_cookie(net);
	bpftune_send_sysctl_event(net, TCP_BUFFER_INCREASE, TCP_BUFFER_TCP_RMEM, old, new, ev);
	if (cookie != BPFTUNE_NETNS_UNKNOWN)
		bpftune_corr_update(TCP_BUFFER_TCP_RMEM, cookie, old[2], rtt);
	return 0;
}

/*
 * A sender that may be limited by its send buffer: the kernel's chrono says
 * so, or the writer waits for buffer space while the peer's window has room
 * (a full peer window means the receiver limits it).  Whether data waits
 * unsent (the congestion window limits it) is left to user space, which
 * gets the unsent byte count.
 */
static __always_inline bool sndbuf_limited(struct sock *sk, struct tcp_sock *tp)
{
	unsigned long sock_flags;
	__u32 inflight, mss;

	if (BPF_CORE_READ_BITFIELD_PROBED(tp, chrono_type) == TCP_CHRONO_SNDBUF)
		return true;
	sock_flags = BPF_CORE_READ(sk, sk_socket, flags);
	if (!(sock_flags & (1UL << SOCK_NOSPACE_BIT)))
		return false;
	inflight = BPF_CORE_READ(tp, snd_nxt) - BPF_CORE_READ(tp, snd_una);
	mss = BPF_CORE_READ(tp, mss_cache);
	return inflight + 2 * mss <= BPF_CORE_READ(tp, snd_wnd);
}

/*
 * Send side: the socket's buffer has reached tcp_wmem[2] while the sender
 * is sndbuf-limited (or the kernel is expanding it: tcp_sndbuf_expand).
 */
static __always_inline int on_snd(struct sock *sk, bool expanding)
{
	struct tcp_sock *tp = (struct tcp_sock *)sk;
	struct tcp_buffer_conn *c;
	struct bpftune_event *ev;
	struct net *net;
	__s64 old[3], new[3];
	__u32 locks, sndbuf, rtt, inflight, unsent;
	__u64 cookie;

	if (!sk)
		return 0;
	if (!expanding && !sndbuf_limited(sk, tp))
		return 0;
	locks = BPF_CORE_READ_BITFIELD_PROBED(sk, sk_userlocks);
	if (locks & SOCK_SNDBUF_LOCK_MASK)
		return 0;
	net = bpftune_sock_net(sk);
	old[0] = BPF_CORE_READ(net, ipv4.sysctl_tcp_wmem[0]);
	old[1] = BPF_CORE_READ(net, ipv4.sysctl_tcp_wmem[1]);
	old[2] = BPF_CORE_READ(net, ipv4.sysctl_tcp_wmem[2]);
	sndbuf = BPF_CORE_READ(sk, sk_sndbuf);
	if (!BPFTUNE_NEARLY_FULL((__s64)sndbuf, old[2]) || old[2] >= INT_MAX_VALUE)
		return 0;
	if (check_memory(sk))
		return 0;
	inflight = BPF_CORE_READ(tp, snd_nxt) - BPF_CORE_READ(tp, snd_una);
	unsent = BPF_CORE_READ(tp, write_seq) - BPF_CORE_READ(tp, snd_nxt);
	if (held(net, TCP_BUFFER_TCP_WMEM, old[2], (__u64)inflight + unsent, BPF_CORE_READ(sk, __sk_common.skc_hash)))
		return 0;
	ev = scratch_event();
	if (!ev)
		return 0;
	rtt = BPF_CORE_READ(tp, srtt_us) >> 3;
	c = (struct tcp_buffer_conn *)&ev->update[1];
	c->flags = TCP_BUFFER_F_SND | TCP_BUFFER_F_LIMIT;
	c->rtt_us = rtt;
	c->min_rtt_us = min_rtt_us(tp);
	c->mss = BPF_CORE_READ(tp, mss_cache);
	c->buf = sndbuf;
	c->queued = BPF_CORE_READ(sk, sk_wmem_queued);
	c->window = inflight;
	c->window_cap = BPF_CORE_READ(tp, snd_wnd);
	c->delivered = BPF_CORE_READ(tp, rate_delivered);
	c->interval_us = BPF_CORE_READ(tp, rate_interval_us);
	c->cwnd = BPF_CORE_READ(tp, snd_cwnd);
	c->conn = BPF_CORE_READ(sk, __sk_common.skc_hash);
	c->bytes = BPF_CORE_READ(tp, bytes_acked);
	c->ts_ns = bpf_ktime_get_ns();
	c->unsent = unsent;
	new[0] = old[0];
	new[1] = old[1];
	new[2] = grow_capped(old[2]);
	cookie = bpftune_netns_cookie(net);
	bpftune_send_sysctl_event(net, TCP_BUFFER_INCREASE, TCP_BUFFER_TCP_WMEM, old, new, ev);
	if (cookie != BPFTUNE_NETNS_UNKNOWN)
		bpftune_corr_update(TCP_BUFFER_TCP_WMEM, cookie, old[2], rtt);
	return 0;
}

static __always_inline struct tcp_buffer_syn_stats *syn_stats_of(__u64 cookie)
{
	struct tcp_buffer_syn_stats zero = {}, *s;

	s = bpf_map_lookup_elem(&bpftune_synstat, &cookie);
	if (!s) {
		bpf_map_update_elem(&bpftune_synstat, &cookie, &zero, BPF_NOEXIST);
		s = bpf_map_lookup_elem(&bpftune_synstat, &cookie);
	}
	return s;
}

/* A connection reached ESTABLISHED (either side). */
static __always_inline int on_state(struct sock *sk, int newstate)
{
	struct tcp_buffer_syn_stats *s;
	__u64 cookie;

	if (!sk || newstate != TCP_ESTABLISHED_STATE)
		return 0;
	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP_NUM)
		return 0;
	cookie = bpftune_netns_cookie(bpftune_sock_net(sk));
	if (cookie != BPFTUNE_NETNS_UNKNOWN) {
		s = syn_stats_of(cookie);
		if (s)
			__sync_fetch_and_add(&s->established, 1);
	}
	if (bpftune_sample(&conn_state_sample))
		check_memory(sk);
	return 0;
}

/*
 * A SYN reached a listener whose request queue is full (the condition
 * under which the kernel calls tcp_syn_flood_action), or one that drops
 * SYNs because fewer than a quarter of tcp_max_syn_backlog remain.
 */
static __always_inline int on_conn_request(struct sock *sk)
{
	struct inet_connection_sock *icsk = (struct inet_connection_sock *)sk;
	struct tcp_buffer_syn_stats *s;
	struct bpftune_event *ev;
	struct net *net;
	__s64 old[3] = {}, new[3] = {};
	__u32 qlen, max_ack, backlog, syncookies;
	__u64 cookie;

	if (!sk)
		return 0;
	net = bpftune_sock_net(sk);
	qlen = BPF_CORE_READ(icsk, icsk_accept_queue.qlen.counter);
	max_ack = BPF_CORE_READ(sk, sk_max_ack_backlog);
	backlog = BPF_CORE_READ(net, ipv4.sysctl_max_syn_backlog);
	syncookies = BPF_CORE_READ(net, ipv4.sysctl_tcp_syncookies);
	if (!(syncookies == 2 || qlen >= max_ack || (!syncookies && backlog - qlen < (backlog >> 2))))
		return 0;
	if (!bpftune_sample(&syn_flood_sample))
		return 0;
	cookie = bpftune_netns_cookie(net);
	if (cookie == BPFTUNE_NETNS_UNKNOWN)
		return 0;
	s = syn_stats_of(cookie);
	if (!s)
		return 0;
	__sync_fetch_and_add(&s->syn_floods, 1);
	bpftune_corr_update(TCP_BUFFER_TCP_MAX_SYN_BACKLOG, cookie, s->syn_floods, s->established);
	ev = scratch_event();
	if (!ev)
		return 0;
	old[0] = backlog;
	new[0] = grow_capped(backlog);
	bpftune_send_sysctl_event(net, TCP_BUFFER_SYN_BACKLOG_INCREASE, TCP_BUFFER_TCP_MAX_SYN_BACKLOG, old, new, ev);
	return 0;
}

/* ---- rcv_space ---------------------------------------------------------------- */

BPFTUNE_TP(rcv_space, tcp_rcv_space_adjust, struct sock *sk)
{
	if (!bpftune_sample(&rcv_space_sample))
		return 0;
	return on_rcv(sk);
}

#ifndef BPFTUNE_LEGACY
BPFTUNE_FENTRY(rcv_space, tcp_rcv_space_adjust, struct sock *sk)
{
	if (!bpftune_sample(&rcv_space_sample))
		return 0;
	return on_rcv(sk);
}
#endif

BPFTUNE_KPROBE(rcv_space, tcp_rcv_space_adjust, struct sock *sk)
{
	if (!bpftune_sample(&rcv_space_sample))
		return 0;
	return on_rcv(sk);
}

/* ---- snd_buf ---------------------------------------------------------------------- */

BPFTUNE_TP(snd_buf, tcp_probe, struct sock *sk, struct sk_buff *skb)
{
	/* tcp_probe fires for every segment received, data or ACK: sample
	 * only among sockets with data queued to send, or a busy receiver
	 * would crowd the senders out of the samples. */
	if (!sk || BPF_CORE_READ(sk, sk_wmem_queued) <= 0)
		return 0;
	if (!bpftune_sample(&snd_buf_sample))
		return 0;
	return on_snd(sk, false);
}

#ifndef BPFTUNE_LEGACY
BPFTUNE_FENTRY(snd_buf, tcp_sndbuf_expand, struct sock *sk)
{
	if (!bpftune_sample(&snd_buf_sample))
		return 0;
	return on_snd(sk, true);
}
#endif

BPFTUNE_KPROBE(snd_buf, tcp_sndbuf_expand, struct sock *sk)
{
	if (!bpftune_sample(&snd_buf_sample))
		return 0;
	return on_snd(sk, true);
}

/* ---- conn_state ------------------------------------------------------------------- */

BPFTUNE_TP(conn_state, inet_sock_set_state, struct sock *sk, int oldstate, int newstate)
{
	return on_state(sk, newstate);
}

/* ---- mem_limit -------------------------------------------------------------------- */

BPFTUNE_TP(mem_limit, sock_exceed_buf_limit, struct sock *sk, struct proto *prot, long allocated, int kind)
{
	if (!sk || BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP_NUM)
		return 0;
	if (!bpftune_sample(&mem_limit_sample))
		return 0;
	check_memory(sk);
	return 0;
}

/* ---- mem_pressure (optional) ------------------------------------------------------ */

#ifndef BPFTUNE_LEGACY
BPFTUNE_FENTRY(mem_pressure, tcp_enter_memory_pressure, struct sock *sk)
{
	check_memory(sk);
	return 0;
}
#endif

BPFTUNE_KPROBE(mem_pressure, tcp_enter_memory_pressure, struct sock *sk)
{
	check_memory(sk);
	return 0;
}

/* ---- syn_flood (optional) --------------------------------------------------------- */

#ifndef BPFTUNE_LEGACY
BPFTUNE_FENTRY(syn_flood, tcp_conn_request, struct request_sock_ops *rsk_ops, void *af_ops, struct sock *sk)
{
	return on_conn_request(sk);
}
#endif

BPFTUNE_KPROBE(syn_flood, tcp_conn_request, struct request_sock_ops *rsk_ops, void *af_ops, struct sock *sk)
{
	return on_conn_request(sk);
}
