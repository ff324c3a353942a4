/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * sample tuner, BPF side: tell user space when a task takes a name starting
 * with "sample" (prctl(PR_SET_NAME), or a write to /proc/<pid>/comm).
 *
 * One signal, "rename", in two forms; the loader keeps the first that loads
 * and attaches here:
 *   tracepoint  task:task_rename(task, comm): tp_btf in the full variant,
 *               raw_tp in the legacy one (BPFTUNE_TP picks);
 *   kprobe      __set_task_comm(task, buf, exec), for kernels or policies
 *               where the tracepoint cannot be used.
 * pybpftune.bpf.h brings the shared ring buffer, the globals the daemon sets
 * (tuner_id among them) and the event helpers; bpftune_send_observation also
 * rate-limits: one event per namespace and key every 25 ms.
 */
#include "pybpftune.bpf.h"

#define SAMPLE_SCENARIO_RENAMED 0
#define SAMPLE_KEY_RENAMED 0
#define TASK_COMM_LEN 16

static __always_inline int renamed(const char *comm)
{
	const char prefix[] = "sample";
	struct bpftune_event event = {};
	struct task_struct *task;
	struct net *net;
	int i;

	if (bpf_probe_read_kernel_str(event.str, TASK_COMM_LEN, comm) < 0)
		return 0;
	for (i = 0; i < sizeof(prefix) - 1; i++) {
		if (event.str[i] != prefix[i])
			return 0;
	}
	/* The namespace of the task that renamed (bpftune_netns_cookie: 0 for
	 * the initial one where cookies cannot be read). */
	task = (struct task_struct *)bpf_get_current_task();
	net = BPF_CORE_READ(task, nsproxy, net_ns);
	bpftune_send_observation(bpftune_netns_cookie(net), SAMPLE_SCENARIO_RENAMED, SAMPLE_KEY_RENAMED,
				 &event);
	return 0;
}

BPFTUNE_TP(rename, task_rename, struct task_struct *task, const char *comm)
{
	return renamed(comm);
}

BPFTUNE_KPROBE(rename, __set_task_comm, struct task_struct *task, const char *buf)
{
	return renamed(buf);
}
