/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Test object for the loader: on every getppid() of the process whose pid
 * user space put in bpftune_pid, send one event carrying a sequence number,
 * the 'magic' global (set before load) and 'value' (writable after load).
 * Two copies of this object feeding one ring buffer prove map sharing.
 * The same signal is written in a tracepoint form and a kprobe form, so the
 * attach chain has something to choose between.
 */
#include "pybpftune.bpf.h"

__u64 magic;
__u64 value;
__u64 seq;

static __always_inline int on_syscall(long id)
{
	struct bpftune_event event = {};
	struct pybpftune_test_payload *payload = (void *)event.raw_data;

	if ((bpf_get_current_pid_tgid() >> 32) != (__u32)bpftune_pid)
		return 0;
	if (id != 110 /* __NR_getppid on x86_64 */)
		return 0;
	/*
	 * Not one fetch-and-add: an atomic that returns its old value (BPF_FETCH)
	 * needs Linux 5.12, and 5.10 refuses the whole program.  One thread of
	 * user space triggers the events, so read-then-add is exact enough.
	 */
	payload->seq = seq;
	__sync_fetch_and_add(&seq, 1);
	payload->magic = magic;
	payload->value = value;
	event.scenario_id = 7;
	bpftune_send_event(&event);
	return 0;
}

BPFTUNE_TP(syscall, sys_enter, struct pt_regs *regs, long id)
{
	return on_syscall(id);
}

SEC("kprobe/__x64_sys_getppid")
int BPF_KPROBE(bpftune_syscall__kprobe)
{
	return on_syscall(110);
}
