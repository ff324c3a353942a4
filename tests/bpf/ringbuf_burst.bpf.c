/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Ring-buffer burst producer for bench/loader_bench.py: every run of the XDP
 * program sends one full-size event (struct bpftune_event, 248 bytes) through
 * bpftune_send_event(), so drops land in bpftune_ringbuf_drops and successes
 * in bpftune_events_sent.  User space drives it with BPF_PROG_TEST_RUN and a
 * large 'repeat' (raw_tp test runs reject repeat; XDP ones accept it), which
 * produces events as fast as the kernel can write them.
 *
 * The program is XDP in both variants (nothing here differs between full and
 * legacy); it is never attached to a device.
 */
#include "pybpftune.bpf.h"

__u64 seq;

SEC("xdp")
int bpftune_ringbuf_burst(struct xdp_md *ctx)
{
	struct bpftune_event event = {};
	struct pybpftune_test_payload *payload = (void *)event.raw_data;

	/*
	 * Not one fetch-and-add: an atomic that returns its old value (BPF_FETCH)
	 * needs Linux 5.12, and 5.10 refuses the whole program.  One thread of
	 * user space triggers the events, so read-then-add is exact enough.
	 */
	payload->seq = seq;
	__sync_fetch_and_add(&seq, 1);
	payload->magic = 0xb0257;
	event.scenario_id = 1;
	bpftune_send_event(&event);
	return XDP_PASS;
}
