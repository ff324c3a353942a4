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

/* ---- tcp_conn tuner ------------------------------------------------------ */

enum tcp_conn_tunable {
	TCP_CONN_TUNABLE_CONG = 0,	/* net.persock.tcp.congestion_control */
	TCP_CONN_TUNABLE_ALLOWED = 1,	/* net.ipv4.tcp_allowed_congestion_control */
	TCP_CONN_TUNABLE_AVAILABLE = 2, /* net.ipv4.tcp_available_congestion_control */
	TCP_CONN_TUNABLE_DEFAULT = 3,	/* net.ipv4.tcp_congestion_control */
	TCP_CONN_TUNABLE_THIN_LTO = 4,	/* net.ipv4.tcp_thin_linear_timeouts */
};

enum tcp_conn_scenario {
	TCP_CONN_SCENARIO_SPECIFY = 0,	/* choose a congestion control (RL, allowed list) */
	TCP_CONN_SCENARIO_LOSS = 1,	/* loss above the threshold: switch to BBR */
};

/* Algorithms the tuner may choose, in this order everywhere. */
enum tcp_conn_alg {
	TCP_CONN_ALG_CUBIC = 0,
	TCP_CONN_ALG_BBR = 1,
	TCP_CONN_ALG_HTCP = 2,
	TCP_CONN_ALG_DCTCP = 3,
	TCP_CONN_NUM_ALGS = 4,
	TCP_CONN_ALG_OTHER = 255,	/* a connection running anything else */
};

enum tcp_conn_reason {
	TCP_CONN_REASON_LOSS = 0,	/* retransmits above 1/64 of segments sent */
	TCP_CONN_REASON_GREEDY = 1,	/* lowest RL cost for the remote host */
	TCP_CONN_REASON_EXPLORE = 2,	/* epsilon-greedy exploration */
	TCP_CONN_NUM_REASONS = 3,
};

/* Rule constants, shared so Python can check it describes the same rules. */
enum tcp_conn_const {
	TCP_CONN_MIN_INSTANCES = 4,	/* connections to a host before RL chooses */
	TCP_CONN_EPSILON = 20,		/* explore with probability 1/20 */
	TCP_CONN_LOSS_SHIFT = 6,	/* loss rule: total_retrans > segs_out >> 6 ... */
	TCP_CONN_MIN_RETRANS = 2,	/* ... and at least 2 retransmits */
};

/* Key of bpftune_ns_off: a namespace where an administrator took over. */
struct tcp_conn_ns_key {
	__u64 netns_cookie;
};

/* A remote host as the RL state is kept: its namespace and address (v4-mapped). */
struct tcp_conn_host_key {
	__u64 netns_cookie;
	__u8 addr[16];
};

struct tcp_conn_alg_stats {
	__u64 metric;		/* moving average of the cost (lower is better) */
	__u64 samples;		/* connections whose cost was measured */
	__u64 chosen;		/* times the tuner chose this algorithm for the host */
	__u64 greedy;		/* ... of them because it had the lowest cost */
	__u64 min_rtt_us;	/* best min RTT seen with this algorithm */
	__u64 max_rate;		/* best delivery rate seen with it (bytes/s) */
};

struct tcp_conn_host {
	__u64 instances;	/* connections established to the host */
	__u64 min_rtt_us;	/* best min RTT over all its connections */
	__u64 max_rate;		/* best delivery rate over all its connections */
	struct tcp_conn_alg_stats alg[TCP_CONN_NUM_ALGS];
};

/* Totals since start (array map, key 0). */
struct tcp_conn_counts {
	__u64 chosen[TCP_CONN_NUM_REASONS][TCP_CONN_NUM_ALGS];
	__u64 connections;	/* established connections seen */
	__u64 measured;		/* connections whose cost was measured at close */
	__u64 thin_lto;		/* connections given TCP_THIN_LINEAR_TIMEOUTS */
	__u64 setsockopt_failed;
	__u64 skipped_netns;	/* connections in namespaces where the tuner is off */
};

/* Event payload: one congestion-control change (rate-limited per netns). */
struct tcp_conn_event {
	__u32 reason;
	__u32 old_alg;
	__u32 new_alg;
	__u32 family;
	__u64 total_retrans;
	__u64 segs_out;
	__u64 cost;
	__u8 addr[16];
};

/* ---- netns tuner ---------------------------------------------------------- */

enum netns_scenario {
	NETNS_SCENARIO_CREATE = 0,
	NETNS_SCENARIO_DESTROY = 1,
};

enum netns_tunable {
	NETNS_TUNABLE_NAMESPACE = 0,	/* network_namespace (bookkeeping only) */
};

/* Event payload: the namespace's inode, so user space needs no setns to map it. */
struct netns_event {
	__u64 inum;
	__u64 cookie;
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

/* ---- neigh_table tuner ---------------------------------------------------- */

enum neigh_table_tunable {
	NEIGH_TABLE_IPV4_GC_INTERVAL = 0,	/* net.ipv4.neigh.default.gc_interval */
	NEIGH_TABLE_IPV4_GC_STALE_TIME = 1,
	NEIGH_TABLE_IPV4_GC_THRESH1 = 2,
	NEIGH_TABLE_IPV4_GC_THRESH2 = 3,
	NEIGH_TABLE_IPV4_GC_THRESH3 = 4,
	NEIGH_TABLE_IPV6_GC_INTERVAL = 5,	/* net.ipv6.neigh.default.* (optional) */
	NEIGH_TABLE_IPV6_GC_STALE_TIME = 6,
	NEIGH_TABLE_IPV6_GC_THRESH1 = 7,
	NEIGH_TABLE_IPV6_GC_THRESH2 = 8,
	NEIGH_TABLE_IPV6_GC_THRESH3 = 9,
	NEIGH_TABLE_ARP_THRESHOLDS = 10,	/* arp_cache gc_thresh1-3 over rtnetlink */
	NEIGH_TABLE_NDISC_THRESHOLDS = 11,	/* ndisc_cache gc_thresh1-3 over rtnetlink */
};

enum neigh_table_scenario {
	NEIGH_TABLE_FULL = 0,		/* entries near gc_thresh3 (or an entry refused) */
	NEIGH_TABLE_GROWN = 1,		/* thresholds reached the device's bound */
	NEIGH_TABLE_EMPTY = 2,		/* a large table is nearly empty */
};

/* neigh_table_stats.flags (an enum, not #defines: user space reads it from the header) */
enum neigh_table_flag {
	NEIGH_TABLE_F_REFUSED = 0x1,	/* neigh_create could not allocate: table full */
};

/* Payload (raw_data) of a neigh_table event; the first 44 bytes as bpftune's tbl_stats. */
struct neigh_table_stats {
	__u32 family;		/* AF_INET (arp_cache) or AF_INET6 (ndisc_cache) */
	__u32 entries;		/* tbl->entries, all namespaces */
	__u32 gc_entries;	/* entries that count against gc_thresh3 */
	__u32 thresh1;
	__u32 thresh2;
	__u32 thresh3;
	__u32 ifindex;		/* device of the entry, in its own namespace */
	char dev[16];
	__u32 flags;		/* enum neigh_table_flag */
	__u32 netns_inum;	/* the device's namespace inode (found without cookies) */
};

/* ---- route_table tuner ---------------------------------------------------- */

enum route_table_tunable {
	ROUTE_TABLE_IPV6_MAX_SIZE = 0,	/* net.ipv6.route.max_size */
};

enum route_table_scenario {
	ROUTE_TABLE_FULL = 0,		/* IPv6 destination table nearly full */
};

/* Payload of the ringbuf test object (tests/bpf) and of the bench object. */
struct pybpftune_test_payload {
	__u64 seq;
	__u64 magic;
	__u64 value;
};

/* ---- tcp_buffer tuner ------------------------------------------------------ */

/* Tunable ids (order of TcpBufferTuner.tunables). */
enum tcp_buffer_tunable {
	TCP_BUFFER_TCP_WMEM = 0,
	TCP_BUFFER_TCP_RMEM = 1,
	TCP_BUFFER_TCP_MEM = 2,
	TCP_BUFFER_TCP_MODERATE_RCVBUF = 3,
	TCP_BUFFER_TCP_NO_METRICS_SAVE = 4,
	TCP_BUFFER_TCP_NO_SSTHRESH_METRICS_SAVE = 5,
	TCP_BUFFER_HIGH_ORDER_ALLOC_DISABLE = 6,
	TCP_BUFFER_TCP_SYNCOOKIES = 7,
	TCP_BUFFER_TCP_MAX_SYN_BACKLOG = 8,
	TCP_BUFFER_TCP_MAX_ORPHANS = 9,
	TCP_BUFFER_NUM_TUNABLES = 10,
};

/* Scenario ids (bpftune's numbering). */
enum tcp_buffer_scenario {
	TCP_BUFFER_INCREASE = 0,
	TCP_BUFFER_DECREASE = 1,
	TCP_BUFFER_DECREASE_LATENCY = 2,
	TCP_BUFFER_MEM_PRESSURE = 3,
	TCP_BUFFER_MEM_EXHAUSTION = 4,
	TCP_BUFFER_MODERATE_RCVBUF = 5,
	TCP_BUFFER_LOW_MEM_ENTER = 6,
	TCP_BUFFER_LOW_MEM_LEAVE = 7,
	TCP_BUFFER_SYN_BACKLOG_INCREASE = 8,
	TCP_BUFFER_SYN_BACKLOG_DECREASE = 9,
	TCP_BUFFER_SYNCOOKIES_ENABLE = 10,
	TCP_BUFFER_SYNCOOKIES_DISABLE = 11,
	TCP_BUFFER_MAX_ORPHANS_INCREASE = 12,
};

/* tcp_buffer_conn.flags */
enum tcp_buffer_conn_flag {
	TCP_BUFFER_F_RCV = 0x1,	    /* receive side (tcp_rmem) */
	TCP_BUFFER_F_SND = 0x2,	    /* send side (tcp_wmem) */
	TCP_BUFFER_F_LIMIT = 0x4,   /* the socket buffer presses against the sysctl max */
	TCP_BUFFER_F_WSCALE = 0x8,  /* receive window capped by the handshake's window scale */
};

/*
 * What one connection looked like when it pressed against a buffer limit;
 * sent after update[0] of a tcp_wmem/tcp_rmem event (struct tcp_buffer_event).
 * Receive side: rtt_us is the receiver's RTT estimate, delivered the bytes
 * read by the application in the last such RTT, window the window the
 * buffer allows (window_clamp), window_cap the largest window the handshake's
 * window scale can advertise.  Send side: rtt_us is srtt, delivered/interval_us
 * the kernel's delivery-rate sample (segments per microseconds), window the
 * bytes in flight, window_cap the peer's advertised window, queued
 * sk_wmem_queued, cwnd the congestion window (segments).
 */
struct tcp_buffer_conn {
	__u32 flags;
	__u32 rtt_us;
	__u32 min_rtt_us;
	__u32 mss;
	__u32 buf;
	__u32 queued;
	__u32 window;
	__u32 window_cap;
	__u32 delivered;
	__u32 interval_us;
	__u32 cwnd;
	__u32 conn; /* the connection's hash (skc_hash): tells samples of one connection apart */
	__u64 bytes; /* receive: bytes_received; send: bytes_acked */
	__u64 ts_ns; /* bpf_ktime_get_ns() when sampled: rate = d(bytes) / d(ts_ns) */
	__u32 unsent; /* send: bytes written but not yet sent (write_seq - snd_nxt) */
	__u32 reserved;
};

struct tcp_buffer_event {
	struct bpftunable_update update;
	struct tcp_buffer_conn conn;
};

/*
 * Hold-off of tcp_rmem/tcp_wmem events (map tcp_buffer_hold), written by user
 * space when it has judged a limit sufficient for a connection (conn: its
 * skc_hash), or for a whole namespace (conn 0, after a growth): until
 * until_ns (bpf_ktime_get_ns), while the limit is still `limit`, events whose
 * metric (receive: bytes read per RTT, rcvq_space.space; send: bytes in
 * flight plus unsent) is at most `metric` are not sent.
 */
struct tcp_buffer_hold_key {
	__u64 netns_cookie;
	__u32 tunable;
	__u32 conn;
};

struct tcp_buffer_hold {
	__u64 until_ns;
	__s64 limit;
	__u64 metric;
};

#endif /* PYBPFTUNE_SHARED_H */
