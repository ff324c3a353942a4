/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * sysctl tuner: notice when anyone but the daemon writes a sysctl, so the
 * tuner owning it can back off in that namespace.
 *
 * bpftune_sysctl_gate, a cgroup/sysctl program on the root cgroup that allows
 * everything, makes the kernel run its sysctl filter on every access.  The
 * write itself is then seen in one of these forms, best first:
 *   fentry / kprobe on __cgroup_bpf_run_filter_sysctl: the writer's pid, the
 *     sysctl's "<dir>/<name>", and the namespace (a net sysctl's own, from
 *     the table's set; the writer's for any other sysctl);
 *   the cgroup/sysctl program itself: the full name, the writer's pid and
 *     its namespace from the current task (kernels that let cgroup programs
 *     read the current task, e.g. 6.18; older ones refuse it at load).
 */
#include "pybpftune.bpf.h"

#define SYSCTL_WRITE_SCENARIO 0

SEC("cgroup/sysctl")
int bpftune_sysctl_gate(struct bpf_sysctl *ctx)
{
	return 1;
}

/*
 * The network namespace a sysctl write is about.  Net sysctls live in a set
 * embedded in their struct net, under the net sysctl root; every other
 * sysctl (kernel.*, vm.*, user.*) belongs to no network namespace, and
 * container_of on its set would read a "cookie" from whatever lies there
 * (for kernel.core_pattern, a kernel address).  The writer's own namespace
 * shows which root is the net one (net->sysctls.dir.header.root), so no
 * kernel symbol is needed.  A sysctl of no namespace is charged to the
 * writer's namespace, as the cgroup/sysctl form does.
 */
static __always_inline struct net *sysctl_net(struct ctl_table_header *head)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct net *writer = BPF_CORE_READ(task, nsproxy, net_ns);
	struct ctl_table_set *set = BPF_CORE_READ(head, set);
	struct ctl_table_root *net_root;

	if (!writer || !set)
		return writer;
	net_root = BPF_CORE_READ(writer, sysctls.dir.header.root);
	if (!net_root || BPF_CORE_READ(head, root) != net_root)
		return writer;
	return (struct net *)((char *)set - bpf_core_field_offset(struct net, sysctls));
}

static __always_inline int on_filter(struct ctl_table_header *head, struct ctl_table *table, int write)
{
	struct bpftune_event event = {};
	struct sysctl_write_event *w = (void *)event.raw_data;
	struct ctl_dir *parent;
	const char *dirname = NULL, *procname;
	int len = 0, n;

	if (!write || !head || !table)
		return 0;
	if ((bpf_get_current_pid_tgid() >> 32) == (__u32)bpftune_pid)
		return 0;
	parent = BPF_CORE_READ(head, parent);
	if (parent)
		dirname = BPF_CORE_READ(parent, header.ctl_table, procname);
	procname = BPF_CORE_READ(table, procname);
	if (dirname) {
		n = bpf_probe_read_kernel_str(w->path, 48, dirname);
		if (n > 0) {
			len = n - 1;
			w->path[len & 63] = '/';
			len = (len + 1) & 63;
		}
	}
	bpf_probe_read_kernel_str(&w->path[len], 48, procname);
	bpf_get_current_comm(w->comm, sizeof(w->comm));
	event.netns_cookie = bpftune_netns_cookie(sysctl_net(head));
	event.scenario_id = SYSCTL_WRITE_SCENARIO;
	bpftune_send_event(&event);
	return 0;
}

#ifndef BPFTUNE_LEGACY
SEC("fentry/__cgroup_bpf_run_filter_sysctl")
int BPF_PROG(bpftune_sysctl_write__fentry, struct ctl_table_header *head, struct ctl_table *table, int write)
{
	return on_filter(head, table, write);
}
#endif

SEC("kprobe/__cgroup_bpf_run_filter_sysctl")
int BPF_KPROBE(bpftune_sysctl_write__kprobe, struct ctl_table_header *head, struct ctl_table *table, int write)
{
	return on_filter(head, table, write);
}

SEC("cgroup/sysctl")
int bpftune_sysctl_write__cgroup_sysctl(struct bpf_sysctl *ctx)
{
	struct bpftune_event event = {};
	struct sysctl_write_event *w = (void *)event.raw_data;
	struct task_struct *task;
	__u32 pid;

	if (!ctx->write)
		return 1;
	pid = bpf_get_current_pid_tgid() >> 32;
	if (pid == (__u32)bpftune_pid)
		return 1;
	if (bpf_sysctl_get_name(ctx, w->path, sizeof(w->path), 0) < 0)
		return 1;
	bpf_get_current_comm(w->comm, sizeof(w->comm));
	task = (struct task_struct *)bpf_get_current_task();
	event.netns_cookie = bpftune_netns_cookie(BPF_CORE_READ(task, nsproxy, net_ns));
	event.scenario_id = SYSCTL_WRITE_SCENARIO;
	bpftune_send_event(&event);
	return 1;
}
