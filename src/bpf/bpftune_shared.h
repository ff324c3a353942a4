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

/* Payload of the ringbuf test object (tests/bpf) and of the bench object. */
struct pybpftune_test_payload {
	__u64 seq;
	__u64 magic;
	__u64 value;
};

#endif /* PYBPFTUNE_SHARED_H */
