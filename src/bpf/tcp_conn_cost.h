/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * tcp_conn tuner: the arithmetic of the congestion-control choice, kept apart
 * so that a test object (tests/bpf/conn_cost_test.bpf.c) can run exactly this
 * code through BPF_PROG_TEST_RUN and compare it with the Python twins in
 * pybpftune/tuners/tcp_conn.py (cost, rl_update, pick, delivery_rate).
 *
 * Cost of one connection to a remote host (lower is better), in millionths:
 *
 *   cost = (rtt - host_min_rtt) * 10^6 / host_min_rtt
 *        + (host_max_rate - rate) * 10^6 / host_max_rate
 *
 * rtt is the connection's own minimum RTT and rate its own delivery rate
 * (not the best rate the algorithm ever achieved: see docs/tuners/tcp_conn.md
 * on bpftune PR #139).  The host's minimum RTT and maximum rate include the
 * connection being scored, so both terms are >= 0 and the rate term <= 10^6.
 */
#ifndef PYBPFTUNE_TCP_CONN_COST_H
#define PYBPFTUNE_TCP_CONN_COST_H

#define TCP_CONN_COST_SCALE 1000000ULL
/* Cap of the RTT term: a 100x worse RTT already says all there is to say. */
#define TCP_CONN_RTT_TERM_MAX (100ULL * TCP_CONN_COST_SCALE)

static __always_inline __u64 tcp_conn_cost(__u64 rtt_us, __u64 host_min_rtt_us, __u64 rate, __u64 host_max_rate)
{
	__u64 cost = 0, term;

	if (host_min_rtt_us && rtt_us > host_min_rtt_us) {
		term = (rtt_us - host_min_rtt_us) * TCP_CONN_COST_SCALE / host_min_rtt_us;
		cost += term > TCP_CONN_RTT_TERM_MAX ? TCP_CONN_RTT_TERM_MAX : term;
	}
	if (host_max_rate && rate < host_max_rate)
		cost += (host_max_rate - rate) * TCP_CONN_COST_SCALE / host_max_rate;
	return cost;
}

/* Exponential moving average with step 2^-shift; the first sample is taken as is. */
static __always_inline __u64 tcp_conn_rl_update(__u64 metric, __u64 samples, __u64 cost, __u32 shift)
{
	if (!samples)
		return cost;
	if (cost >= metric)
		return metric + ((cost - metric) >> shift);
	return metric - ((metric - cost) >> shift);
}

/* Delivery rate in bytes/s from a rate sample (packets over an interval). */
static __always_inline __u64 tcp_conn_delivery_rate(__u64 delivered, __u64 mss, __u64 interval_us)
{
	if (!interval_us)
		return 0;
	return delivered * mss * 1000000ULL / interval_us;
}

/*
 * Algorithm with the lowest metric among those in avail_mask; one never
 * measured counts as cost 0 so that each is tried once.  Ties go to the first
 * found starting from index `start` (the caller passes a random start).
 * Returns TCP_CONN_NUM_ALGS when none is available.
 */
static __always_inline __u32 tcp_conn_pick(const __u64 *metric, const __u64 *samples, __u32 avail_mask, __u32 start)
{
	__u64 best_cost = ~0ULL, m;
	__u32 best = TCP_CONN_NUM_ALGS, i, a;

	for (i = 0; i < TCP_CONN_NUM_ALGS; i++) {
		a = (start + i) % TCP_CONN_NUM_ALGS;
		if (!(avail_mask & (1U << a)))
			continue;
		m = samples[a] ? metric[a] : 0;
		if (m < best_cost) {
			best_cost = m;
			best = a;
		}
	}
	return best;
}

#endif /* PYBPFTUNE_TCP_CONN_COST_H */
