/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The one definition of every layout that crosses the kernel/user boundary.
 *
 * Compiled three ways: by clang for the BPF objects (after vmlinux.h), by the C
 * compiler in the cffi extension (after <linux/types.h>), and, preprocessed with
 * PYBPFTUNE_CDEF defined, as the cffi cdef.  In API mode the C compiler decides
 * the offsets, so Python can never drift from what the BPF side writes.
 *
 * Keep this file to plain declarations: integer #defines, enums, structs.
 */
#ifndef PYBPFTUNE_SHARED_H
#define PYBPFTUNE_SHARED_H

#define BPFTUNE_MAX_TUNERS 64
#define BPFTUNE_MAX_VALUES 3
#define BPFTUNE_MAX_UPDATES 4
#define BPFTUNE_MAX_STR 128
#define BPFTUNE_MAX_DATA 128

/* netns_cookie of an event whose namespace could not be identified. */
#define BPFTUNE_NETNS_UNKNOWN 0xffffffffffffffffULL

/* One proposed change of a tunable: the BPF side's view of old and new values. */
struct bpftunable_update {
	__u32 id;
	__u32 pad;
	__s64 old[BPFTUNE_MAX_VALUES];
	__s64 new[BPFTUNE_MAX_VALUES];
};

/* Wire format of the shared ring buffer; bpftune-compatible (248 bytes). */
struct bpftune_event {
	__u32 tuner_id;
	__u32 scenario_id;
	__u64 netns_cookie;
	__s32 pid;
	__u32 pad;
	union {
		struct bpftunable_update update[BPFTUNE_MAX_UPDATES];
		char str[BPFTUNE_MAX_STR];
		__u8 raw_data[BPFTUNE_MAX_DATA];
	};
};

/* Adaptive sampling state of one hot hook (reported in the summary). */
struct bpftune_sample {
	__u64 count;
	__u64 ts;
	__u64 rate;
};

/* Running sums for a Pearson correlation, keyed by tuner and tunable. */
struct corr_key {
	__u32 tuner_id;
	__u32 id;
	__u64 netns_cookie;
};

struct corr {
	__u64 n;
	__u64 sum_x;
	__u64 sum_x_sq;
	__u64 sum_y;
	__u64 sum_y_sq;
	__u64 sum_xy;
};

/* sysctl tuner payload: which sysctl was written, and the writer's comm. */
struct sysctl_write_event {
	char path[112];
	char comm[16];
};

/* --- net_buffer tuner ----------------------------------------------------- */
enum net_buffer_tunable {
	NET_BUFFER_MAX_BACKLOG = 0,		/* net.core.netdev_max_backlog */
	NET_BUFFER_FLOW_LIMIT_CPU_BITMAP = 1,	/* net.core.flow_limit_cpu_bitmap */
	NET_BUFFER_BUDGET = 2,			/* net.core.netdev_budget */
	NET_BUFFER_BUDGET_USECS = 3,		/* net.core.netdev_budget_usecs */
	NET_BUFFER_HIGH_ORDER_ALLOC_DISABLE = 4,/* net.core.high_order_alloc_disable */
};

enum net_buffer_scenario {
	NET_BUFFER_INCREASE_BACKLOG = 0,
	NET_BUFFER_SET_FLOW_LIMIT = 1,
	NET_BUFFER_INCREASE_BUDGET = 2,
	NET_BUFFER_DECREASE_BUDGET = 3,
	NET_BUFFER_ENABLE_HIGH_ORDER_ALLOC = 4,
};

/* scenario_id of a net_buffer event: what the BPF side observed. */
enum net_buffer_observation {
	NET_BUFFER_OBS_BACKLOG_DROPS = 1,	/* per-cpu backlog queue overflowed */
	NET_BUFFER_OBS_TIME_SQUEEZE = 2,	/* net_rx_action ran out of budget or time */
};

struct net_buffer_obs {
	__u32 cpu;
	__u32 pad;
	__u64 drops;		/* backlog drops counted since the window opened */
	__u64 window_ns;	/* how long the window has been open */
	__u64 max_backlog;	/* netdev_max_backlog as the BPF side knows it */
	__u64 time_squeeze;	/* softnet_data.time_squeeze of that cpu */
	__u64 prev_time_squeeze;
};

/* --- ip_frag tuner -------------------------------------------------------- */
enum ip_frag_tunable {
	IP_FRAG_IPV4_HIGH_THRESH = 0,	/* net.ipv4.ipfrag_high_thresh */
	IP_FRAG_IPV6_HIGH_THRESH = 1,	/* net.ipv6.ip6frag_high_thresh */
};

enum ip_frag_scenario {
	IP_FRAG_INCREASE = 0,
	IP_FRAG_DECREASE = 1,
};

/* scenario_id of an ip_frag event. */
enum ip_frag_observation {
	IP_FRAG_OBS_NEAR_THRESH = 1,	/* reassembly memory of a netns nears high_thresh */
};

struct ip_frag_obs {
	__u32 family;		/* AF_INET or AF_INET6 */
	__u32 pad;
	__s64 mem;		/* fqdir->mem: bytes held by fragment queues */
	__s64 high_thresh;	/* fqdir->high_thresh as the kernel sees it */
	__s64 low_thresh;
};

/* --- udp_buffer tuner ----------------------------------------------------- */
enum udp_buffer_tunable {
	UDP_BUFFER_UDP_MEM = 0,		/* net.ipv4.udp_mem */
	UDP_BUFFER_RMEM_MAX = 1,	/* net.core.rmem_max */
	UDP_BUFFER_RMEM_DEFAULT = 2,	/* net.core.rmem_default */
};

enum udp_buffer_scenario {
	UDP_BUFFER_INCREASE = 0,
	UDP_BUFFER_DECREASE = 1,
	UDP_BUFFER_MEM_PRESSURE = 2,
	UDP_BUFFER_MEM_EXHAUSTION = 3,
};

/* scenario_id of a udp_buffer event. */
enum udp_buffer_observation {
	UDP_BUFFER_OBS_RCVBUF_FULL = 1,	/* a receive queue reached sk_rcvbuf */
	UDP_BUFFER_OBS_MEM_LIMIT = 2,	/* udp_mem accounting refused a datagram */
};

/* Which hook saw it. */
enum udp_buffer_source {
	UDP_BUFFER_SRC_FAIL_QUEUE = 1,	/* udp:udp_fail_queue_rcv_skb */
	UDP_BUFFER_SRC_RCVQUEUE_FULL = 2,	/* sock:sock_rcvqueue_full */
	UDP_BUFFER_SRC_EXCEED_BUF = 3,	/* sock:sock_exceed_buf_limit */
};

struct udp_buffer_obs {
	__u32 source;		/* enum udp_buffer_source */
	__s32 error;		/* -ENOMEM, -ENOBUFS (fail_queue), else 0 */
	__u32 family;
	__u32 userlocks;	/* sk_userlocks: SOCK_RCVBUF_LOCK = 2 */
	__s64 sk_rcvbuf;
	__s64 rmem_alloc;
	__s64 mem_allocated;	/* pages charged to the protocol */
	__s64 mem[3];		/* the protocol's limits (udp_mem), pages */
};

/* Payload of the ringbuf test object (tests/bpf) and of the bench object. */
struct pybpftune_test_payload {
	__u64 seq;
	__u64 magic;
	__u64 value;
};

#endif /* PYBPFTUNE_SHARED_H */
