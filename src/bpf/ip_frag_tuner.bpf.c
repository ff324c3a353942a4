/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * ip_frag tuner: notice when the memory held by a namespace's IPv4 or IPv6
 * fragment queues (fqdir->mem) nears fqdir->high_thresh, above which the
 * kernel drops every new fragment; user space then raises the threshold in
 * that namespace (fqdir is per netns, and so are the sysctls).
 *
 * One signal, "frag", in these forms, best first (the tuner asks for the
 * defrag path before the loader's usual tracepoints-first order):
 *   fentry           ip_defrag (IPv4) and ipv6_frag_rcv (IPv6): fragments only;
 *   kprobe           the same two functions;
 *   tp_btf / raw_tp  net:netif_receive_skb: every received IP packet, sampled;
 *                    works on every kernel, including the development host.
 * The check is the same in every form: read the receiving namespace's fqdir
 * and report it when mem is within one step of high_thresh.
 */
#include "pybpftune.bpf.h"
#include <bpf/bpf_endian.h>

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define AF_INET 2
#define AF_INET6 10

struct bpftune_sample rx_sample;
struct bpftune_sample defrag_sample;

static __always_inline int check_fqdir(struct net *net, struct fqdir *fq, __u32 family)
{
	struct bpftune_event event = {};
	struct ip_frag_obs *o = (void *)event.raw_data;
	long mem, high;
	__u64 cookie;

	if (!fq)
		return 0;
	mem = BPF_CORE_READ(fq, mem.counter);
	if (mem <= 0)
		return 0;
	high = BPF_CORE_READ(fq, high_thresh);
	if (high <= 0 || !BPFTUNE_NEARLY_FULL(mem, high))
		return 0;
	/* The thresholds are per namespace: without a cookie we cannot act. */
	cookie = bpftune_netns_cookie(net);
	if (cookie == BPFTUNE_NETNS_UNKNOWN)
		return 0;
	o->family = family;
	o->mem = mem;
	o->high_thresh = high;
	o->low_thresh = BPF_CORE_READ(fq, low_thresh);
	/* fentry/fexit programs must return 0 (6.1 verifier) */
	bpftune_send_observation(cookie, IP_FRAG_OBS_NEAR_THRESH,
					family == AF_INET ? IP_FRAG_IPV4_HIGH_THRESH :
							    IP_FRAG_IPV6_HIGH_THRESH,
					&event);
	return 0;
}

static __always_inline int check_net(struct net *net, __u32 family)
{
	if (!net)
		return 0;
	if (family == AF_INET)
		return check_fqdir(net, BPF_CORE_READ(net, ipv4.fqdir), AF_INET);
	return check_fqdir(net, BPF_CORE_READ(net, ipv6.fqdir), AF_INET6);
}

static __always_inline int check_skb(struct sk_buff *skb, __u32 family)
{
	return check_net(BPF_CORE_READ(skb, dev, nd_net.net), family);
}

BPFTUNE_TP(frag, netif_receive_skb, struct sk_buff *skb)
{
	__u16 proto;

	if (!bpftune_sample(&rx_sample))
		return 0;
	proto = bpf_ntohs(BPF_CORE_READ(skb, protocol));
	if (proto == ETH_P_IP)
		return check_skb(skb, AF_INET);
	if (proto == ETH_P_IPV6)
		return check_skb(skb, AF_INET6);
	return 0;
}

#ifndef BPFTUNE_LEGACY
SEC("fentry/ip_defrag")
int BPF_PROG(bpftune_frag__fentry4, struct net *net, struct sk_buff *skb, u32 user)
{
	if (!bpftune_sample(&defrag_sample))
		return 0;
	return check_net(net, AF_INET);
}

SEC("fentry/ipv6_frag_rcv")
int BPF_PROG(bpftune_frag__fentry6, struct sk_buff *skb)
{
	if (!bpftune_sample(&defrag_sample))
		return 0;
	return check_skb(skb, AF_INET6);
}
#endif

SEC("kprobe/ip_defrag")
int BPF_KPROBE(bpftune_frag__kprobe4, struct net *net, struct sk_buff *skb, u32 user)
{
	if (!bpftune_sample(&defrag_sample))
		return 0;
	return check_net(net, AF_INET);
}

SEC("kprobe/ipv6_frag_rcv")
int BPF_KPROBE(bpftune_frag__kprobe6, struct sk_buff *skb)
{
	if (!bpftune_sample(&defrag_sample))
		return 0;
	return check_skb(skb, AF_INET6);
}
