/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Support probe: one trivial program per program kind pybpftune may use.
 * The loader loads and attaches them one at a time to learn what the running
 * kernel really allows (a kind may load but fail to attach, as kprobes do
 * without a kprobe PMU).  Targets are functions and tracepoints present on
 * every kernel pybpftune supports.  No maps: the ring buffer is probed apart.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

__u64 probe_hits;

SEC("fentry/tcp_v4_connect")
int BPF_PROG(bpftune_probe_fentry)
{
	probe_hits++;
	return 0;
}

SEC("fexit/tcp_v4_connect")
int BPF_PROG(bpftune_probe_fexit)
{
	probe_hits++;
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(bpftune_probe_tp_btf)
{
	probe_hits++;
	return 0;
}

SEC("raw_tp/sched_process_exit")
int BPF_PROG(bpftune_probe_raw_tp)
{
	probe_hits++;
	return 0;
}

SEC("kprobe/tcp_v4_connect")
int BPF_KPROBE(bpftune_probe_kprobe)
{
	probe_hits++;
	return 0;
}

SEC("kretprobe/tcp_v4_connect")
int BPF_KRETPROBE(bpftune_probe_kretprobe)
{
	probe_hits++;
	return 0;
}

SEC("iter/tcp")
int bpftune_probe_iter(struct bpf_iter__tcp *ctx)
{
	return 0;
}

SEC("cgroup/sysctl")
int bpftune_probe_cgroup_sysctl(struct bpf_sysctl *ctx)
{
	return 1;
}

SEC("sockops")
int bpftune_probe_sockops(struct bpf_sock_ops *ctx)
{
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
