/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Deliberately broken: an fentry program the verifier must reject (it reads
 * through a pointer it never checked).  Used to show that a kernel test stage
 * fails, not skips, when a required program cannot load.
 */
#include "pybpftune.bpf.h"

SEC("fentry/tcp_v4_connect")
int BPF_PROG(bpftune_connect__fentry, struct sock *sk)
{
	__u64 *p = (__u64 *)(long)bpftune_pid;

	return *p == 0;
}
