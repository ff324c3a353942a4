/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Packet loss for kernels without sch_netem: attached (generic XDP, with
 * `ip link set DEV xdpgeneric obj loss_xdp.bpf.o sec xdp`) to the receiving
 * end of a veth, it drops about one in ten TCP segments that carry data, so
 * the sender sees real losses and retransmits.  SYNs, pure ACKs and non-TCP
 * traffic (ARP, ICMP) pass, so connections still open promptly.
 * Not named bpftune_*: it stands in for the network, not for the daemon
 * (iproute2 loads it; pybpftune never does).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_TCP_ 6
#define LOSS_ONE_IN 10

__u64 loss_seen, loss_dropped;

SEC("xdp")
int loss_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct tcphdr *tcp;
	__u32 payload;

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP_ || ip->ihl != 5)
			return XDP_PASS;
		tcp = (void *)(ip + 1);
		if ((void *)(tcp + 1) > end)
			return XDP_PASS;
		payload = bpf_ntohs(ip->tot_len) - 20 - tcp->doff * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP_)
			return XDP_PASS;
		tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > end)
			return XDP_PASS;
		payload = bpf_ntohs(ip6->payload_len) - tcp->doff * 4;
	} else {
		return XDP_PASS;
	}
	if (tcp->syn || (int)payload <= 0)
		return XDP_PASS;
	loss_seen++;
	if (bpf_get_prandom_u32() % LOSS_ONE_IN)
		return XDP_PASS;
	loss_dropped++;
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
