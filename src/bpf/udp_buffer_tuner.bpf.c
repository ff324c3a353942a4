/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * udp_buffer tuner: notice datagrams dropped because a receive queue was
 * full (rmem_default, rmem_max) or because UDP memory accounting refused them
 * (udp_mem), and tell user space what was seen; the rules live in Python.
 *
 * Signals, each a tracepoint present since long before 5.10, so both variants
 * (tp_btf / raw_tp) work on every kernel with a ring buffer:
 *   fail_queue     udp:udp_fail_queue_rcv_skb(rc, sk[, skb]): rc -ENOMEM is a
 *                  full receive queue, -ENOBUFS a udp_mem refusal (required);
 *   rcvqueue_full  sock:sock_rcvqueue_full(sk, skb): datagram sockets that
 *                  queue through sock_queue_rcv_skb (raw, ping, encap);
 *   exceed_buf     sock:sock_exceed_buf_limit(sk, prot, allocated, kind):
 *                  receive-side memory accounting over the protocol limits.
 * Every hook is sampled (bpftune_sample) and events are deduplicated per
 * kind, so a drop storm costs a few loads per sampled call.
 */
#include "pybpftune.bpf.h"

#define ENOMEM 12
#define ENOBUFS 105
#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_UDPLITE 136
#define SOCK_RCVBUF_LOCK 2
#define SK_MEM_RECV 1

/* Mirrors of the sysctls, kept current by user space. */
__s64 rmem_max = 212992;
__s64 rmem_default = 212992;

struct bpftune_sample fail_queue_sample;
struct bpftune_sample rcvqueue_full_sample;
struct bpftune_sample exceed_buf_sample;

/* Would user space's rules act on a full queue of this size? */
static __always_inline bool rcvbuf_worth_reporting(__s64 rcvbuf, __u32 userlocks)
{
	if (userlocks & SOCK_RCVBUF_LOCK)
		/* SO_RCVBUF doubles the request, capped at rmem_max. */
		return BPFTUNE_NEARLY_FULL(rcvbuf, 2 * rmem_max);
	return BPFTUNE_NEARLY_FULL(rcvbuf, rmem_default);
}

static __always_inline int observe(struct sock *sk, struct proto *prot, __u32 kind, __u32 source,
				   int error, __s64 allocated)
{
	struct bpftune_event event = {};
	struct udp_buffer_obs *o = (void *)event.raw_data;
	atomic_long_t *ma;
	long *limits;

	if (!sk)
		return 0;
	o->source = source;
	o->error = error;
	o->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	o->sk_rcvbuf = BPF_CORE_READ(sk, sk_rcvbuf);
	o->rmem_alloc = BPF_CORE_READ(sk, sk_backlog.rmem_alloc.counter);
	o->userlocks = BPF_CORE_READ_BITFIELD_PROBED(sk, sk_userlocks);
	if (!prot)
		prot = BPF_CORE_READ(sk, __sk_common.skc_prot);
	if (prot) {
		limits = BPF_CORE_READ(prot, sysctl_mem);
		if (limits)
			bpf_probe_read_kernel(o->mem, sizeof(o->mem), limits);
		if (allocated < 0) {
			ma = BPF_CORE_READ(prot, memory_allocated);
			if (ma)
				bpf_probe_read_kernel(&allocated, sizeof(allocated), &ma->counter);
		}
	}
	o->mem_allocated = allocated;

	if (kind == UDP_BUFFER_OBS_RCVBUF_FULL) {
		if (!rcvbuf_worth_reporting(o->sk_rcvbuf, o->userlocks))
			return 0;
	} else if (o->mem[0] <= 0 || o->mem_allocated <= o->mem[0]) {
		/* Not above udp_mem[0]: refused by a memory cgroup, not by udp_mem. */
		return 0;
	}
	/* fentry/fexit programs must return 0 (6.1 verifier) */
	bpftune_send_observation(bpftune_netns_cookie(bpftune_sock_net(sk)), kind, kind, &event);
	return 0;
}

BPFTUNE_TP(fail_queue, udp_fail_queue_rcv_skb, int rc, struct sock *sk)
{
	if (rc != -ENOMEM && rc != -ENOBUFS)
		return 0;
	if (!bpftune_sample(&fail_queue_sample))
		return 0;
	return observe(sk, NULL, rc == -ENOBUFS ? UDP_BUFFER_OBS_MEM_LIMIT : UDP_BUFFER_OBS_RCVBUF_FULL,
		       UDP_BUFFER_SRC_FAIL_QUEUE, rc, -1);
}

BPFTUNE_TP(rcvqueue_full, sock_rcvqueue_full, struct sock *sk, struct sk_buff *skb)
{
	__u16 family, protocol;

	/* Filter before sampling, so other sockets' overflows do not slow
	 * the sampling of the ones we care about. */
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	protocol = BPF_CORE_READ(sk, sk_protocol);
	if ((family != AF_INET && family != AF_INET6) || protocol == IPPROTO_TCP)
		return 0;
	if (!bpftune_sample(&rcvqueue_full_sample))
		return 0;
	return observe(sk, NULL, UDP_BUFFER_OBS_RCVBUF_FULL, UDP_BUFFER_SRC_RCVQUEUE_FULL, 0, -1);
}

BPFTUNE_TP(exceed_buf, sock_exceed_buf_limit, struct sock *sk, struct proto *prot, long allocated,
	   int kind)
{
	__u16 protocol;

	if (kind != SK_MEM_RECV)
		return 0;
	protocol = BPF_CORE_READ(sk, sk_protocol);
	if (protocol != IPPROTO_UDP && protocol != IPPROTO_UDPLITE)
		return 0;
	if (!bpftune_sample(&exceed_buf_sample))
		return 0;
	return observe(sk, prot, UDP_BUFFER_OBS_MEM_LIMIT, UDP_BUFFER_SRC_EXCEED_BUF, 0, allocated);
}
