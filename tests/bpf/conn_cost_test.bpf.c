/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Runs the tcp_conn tuner's arithmetic (src/bpf/tcp_conn_cost.h) on inputs
 * set from user space, through BPF_PROG_TEST_RUN, so tests can compare it
 * with the Python twins in pybpftune.tuners.tcp_conn on many inputs.
 */
#include "pybpftune.bpf.h"
#include "tcp_conn_cost.h"

__u64 in_rtt, in_min_rtt, in_rate, in_max_rate;
__u64 in_metric, in_samples, in_cost;
__u32 in_shift;
__u64 in_delivered, in_mss, in_interval;
__u64 in_metrics[TCP_CONN_NUM_ALGS], in_sample_counts[TCP_CONN_NUM_ALGS];
__u32 in_mask, in_start;

__u64 out_cost, out_metric, out_rate;
__u32 out_pick;

SEC("xdp")
int bpftune_conn_cost_test(struct xdp_md *ctx)
{
	out_cost = tcp_conn_cost(in_rtt, in_min_rtt, in_rate, in_max_rate);
	out_metric = tcp_conn_rl_update(in_metric, in_samples, in_cost, in_shift);
	out_rate = tcp_conn_delivery_rate(in_delivered, in_mss, in_interval);
	out_pick = tcp_conn_pick(in_metrics, in_sample_counts, in_mask, in_start);
	return XDP_PASS;
}
