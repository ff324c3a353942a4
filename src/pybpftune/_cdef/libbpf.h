/* The subset of libbpf (system library, >= 1.0) that pybpftune's loader uses.
 * cffi API mode: the C compiler checks these against <bpf/libbpf.h>, and fills
 * in every "..." (struct layouts, enum values) from the real headers. */

struct bpf_object;
struct bpf_program;
struct bpf_map;
struct bpf_link;
struct ring_buffer;

enum bpf_prog_type { ... };
enum bpf_map_type { ... };
enum bpf_attach_type { ... };

#define BPF_PROG_TYPE_KPROBE ...
#define BPF_PROG_TYPE_TRACEPOINT ...
#define BPF_PROG_TYPE_RAW_TRACEPOINT ...
#define BPF_PROG_TYPE_TRACING ...
#define BPF_PROG_TYPE_CGROUP_SYSCTL ...
#define BPF_PROG_TYPE_SOCK_OPS ...
#define BPF_PROG_TYPE_XDP ...
#define BPF_PROG_TYPE_SCHED_CLS ...
#define BPF_MAP_TYPE_RINGBUF ...
#define BPF_MAP_TYPE_HASH ...
#define BPF_MAP_TYPE_ARRAY ...
#define BPF_TRACE_FENTRY ...
#define BPF_TRACE_FEXIT ...
#define BPF_TRACE_RAW_TP ...
#define BPF_TRACE_ITER ...
#define BPF_CGROUP_SYSCTL ...
#define BPF_CGROUP_SOCK_OPS ...
#define BPF_F_ALLOW_MULTI ...
#define BPF_ANY ...
#define BPF_NOEXIST ...
#define BPF_EXIST ...
#define LIBBPF_WARN ...
#define LIBBPF_INFO ...
#define LIBBPF_DEBUG ...

struct bpf_object_open_opts {
	size_t sz;
	const char *object_name;
	...;
};

struct bpf_test_run_opts {
	size_t sz;
	const void *data_in;
	__u32 data_size_in;
	__u32 retval;
	int repeat;
	...;
};

struct bpf_prog_info {
	__u32 type;
	__u32 id;
	char name[16];
	...;
};

__u32 libbpf_major_version(void);
__u32 libbpf_minor_version(void);
const char *libbpf_version_string(void);
int libbpf_probe_bpf_map_type(enum bpf_map_type map_type, const void *opts);

struct bpf_object *bpf_object__open_mem(const void *obj_buf, size_t obj_buf_sz,
					const struct bpf_object_open_opts *opts);
struct bpf_object *bpf_object__open_file(const char *path,
					 const struct bpf_object_open_opts *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
const char *bpf_object__name(const struct bpf_object *obj);
struct bpf_program *bpf_object__next_program(const struct bpf_object *obj,
					     struct bpf_program *prog);
struct bpf_map *bpf_object__next_map(const struct bpf_object *obj,
				     const struct bpf_map *map);

const char *bpf_program__name(const struct bpf_program *prog);
const char *bpf_program__section_name(const struct bpf_program *prog);
enum bpf_prog_type bpf_program__type(const struct bpf_program *prog);
enum bpf_attach_type bpf_program__expected_attach_type(const struct bpf_program *prog);
bool bpf_program__autoload(const struct bpf_program *prog);
int bpf_program__set_autoload(struct bpf_program *prog, bool autoload);
int bpf_program__fd(const struct bpf_program *prog);
struct bpf_link *bpf_program__attach(const struct bpf_program *prog);
struct bpf_link *bpf_program__attach_cgroup(const struct bpf_program *prog, int cgroup_fd);

const char *bpf_map__name(const struct bpf_map *map);
enum bpf_map_type bpf_map__type(const struct bpf_map *map);
__u32 bpf_map__key_size(const struct bpf_map *map);
__u32 bpf_map__value_size(const struct bpf_map *map);
__u32 bpf_map__max_entries(const struct bpf_map *map);
int bpf_map__set_max_entries(struct bpf_map *map, __u32 max_entries);
int bpf_map__fd(const struct bpf_map *map);
int bpf_map__reuse_fd(struct bpf_map *map, int fd);
bool bpf_map__is_internal(const struct bpf_map *map);
const void *bpf_map__initial_value(struct bpf_map *map, size_t *psize);

int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_update_elem(int fd, const void *key, const void *value, __u64 flags);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);

int bpf_link__fd(const struct bpf_link *link);
int bpf_link__destroy(struct bpf_link *link);

int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);
int bpf_prog_get_next_id(__u32 start_id, __u32 *next_id);
int bpf_prog_get_fd_by_id(__u32 id);
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, __u32 *info_len);
int bpf_prog_query(int target_fd, enum bpf_attach_type type, __u32 query_flags,
		   __u32 *attach_flags, __u32 *prog_ids, __u32 *prog_cnt);
int bpf_prog_detach2(int prog_fd, int attachable_fd, enum bpf_attach_type type);

typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
struct ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb,
				     void *ctx, const void *opts);
void ring_buffer__free(struct ring_buffer *rb);
int ring_buffer__add(struct ring_buffer *rb, int map_fd,
		     ring_buffer_sample_fn sample_cb, void *ctx);
int ring_buffer__poll(struct ring_buffer *rb, int timeout_ms);
int ring_buffer__consume(struct ring_buffer *rb);
int ring_buffer__epoll_fd(const struct ring_buffer *rb);
