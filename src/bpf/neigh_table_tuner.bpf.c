/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * neigh_table tuner: report a neighbour table (arp_cache, ndisc_cache) whose
 * entries approach gc_thresh3, or a large one that has nearly emptied.
 *
 * Signals and their forms, best first:
 *   neigh_add:    tracepoint neigh:neigh_create (tp_btf / raw_tp) - fires
 *                 after the entry was counted, with a NULL entry when the
 *                 table refused it;
 *   neigh_remove: tracepoint neigh:neigh_cleanup_and_release (tp_btf /
 *                 raw_tp), then fentry / kprobe on neigh_remove_one (which
 *                 sees only administrative deletions).
 *
 * The hooks fire once per neighbour entry created or released, not per
 * packet, and the kernel does far more work per entry (allocation, hashing,
 * forced GC) than the few reads here, so they filter rather than sample:
 * sampling would miss the end of a burst, which is exactly when a table fills.
 * What reaches the ring buffer is limited per (namespace, table, scenario,
 * fill level) to one event every 25 ms, the fill level being entries in
 * 1/64ths of gc_thresh3: a rate limit alone would drop the end of a burst that
 * follows a sent event within 25 ms, and with it the table's final state.
 * User space reads the live table when it handles an event.
 */
#include "pybpftune.bpf.h"

#define NEIGH_DEFAULT_THRESH3 1024
static __always_inline int neigh_report(struct neigh_table *tbl, struct net_device *dev, bool add,
					bool refused)
{
	struct bpftune_event event = {};
	struct neigh_table_stats *stats = (struct neigh_table_stats *)event.raw_data;
	__u32 entries, thresh3, scenario, level;
	__u64 cookie = BPFTUNE_NETNS_UNKNOWN;
	struct net *net;

	if (!tbl)
		return 0;
	entries = BPF_CORE_READ(tbl, entries.counter);
	thresh3 = BPF_CORE_READ(tbl, gc_thresh3);
	if (add) {
		if (!refused && !BPFTUNE_NEARLY_FULL(entries, thresh3))
			return 0;
		scenario = NEIGH_TABLE_FULL;
	} else {
		if (thresh3 <= NEIGH_DEFAULT_THRESH3 || !BPFTUNE_NEARLY_EMPTY(entries, thresh3))
			return 0;
		scenario = NEIGH_TABLE_EMPTY;
	}
	stats->family = BPF_CORE_READ(tbl, family);
	stats->entries = entries;
	if (bpf_core_field_exists(tbl->gc_entries))
		stats->gc_entries = BPF_CORE_READ(tbl, gc_entries.counter);
	else
		stats->gc_entries = entries;
	stats->thresh1 = BPF_CORE_READ(tbl, gc_thresh1);
	stats->thresh2 = BPF_CORE_READ(tbl, gc_thresh2);
	stats->thresh3 = thresh3;
	stats->flags = refused ? NEIGH_TABLE_F_REFUSED : 0;
	if (dev) {
		stats->ifindex = BPF_CORE_READ(dev, ifindex);
		bpf_probe_read_kernel_str(stats->dev, sizeof(stats->dev), dev->name);
		net = BPF_CORE_READ(dev, nd_net.net);
		if (net)
			stats->netns_inum = BPF_CORE_READ(net, ns.inum);
		cookie = bpftune_netns_cookie(net);
	}
	/* One event per (namespace, scenario, fill level, table) per 25 ms. */
	level = entries / ((thresh3 >> 6) | 1);
	if (level > 255)
		level = 255;
	return bpftune_send_observation(cookie, scenario, (scenario << 16) | (level << 8) | (stats->family & 0xff),
					&event);
}

BPFTUNE_TP(neigh_add, neigh_create, struct neigh_table *tbl, struct net_device *dev, const void *pkey,
	   const struct neighbour *n, bool exempt_from_gc)
{
	return neigh_report(tbl, dev, true, n == NULL);
}

static __always_inline int neigh_released(struct neighbour *n)
{
	if (!n)
		return 0;
	return neigh_report(BPF_CORE_READ(n, tbl), BPF_CORE_READ(n, dev), false, false);
}

BPFTUNE_TP(neigh_remove, neigh_cleanup_and_release, struct neighbour *n, int rc)
{
	return neigh_released(n);
}

#ifndef BPFTUNE_LEGACY
BPFTUNE_FENTRY(neigh_remove, neigh_remove_one, struct neighbour *n)
{
	/* fentry programs must return 0 (Linux 6.12's verifier enforces it). */
	neigh_released(n);
	return 0;
}
#endif

BPFTUNE_KPROBE(neigh_remove, neigh_remove_one, struct neighbour *n)
{
	return neigh_released(n);
}
