/* Small C helpers compiled into the extension (see build_ffi.py). */

/* Route libbpf's print callback to Python logging (pybpftune_libbpf_log). */
void pybpftune_install_print(void);

/* Find a global variable in an object's BTF: the data section it lives in
 * (".bss", ".data", ".rodata"), its offset and size.  0 or -ENOENT. */
int pybpftune_find_global(struct bpf_object *obj, const char *name, char *section,
			  size_t section_len, unsigned int *offset, unsigned int *size);

/* A loaded program's full name (its BTF function name, as bpftool shows it),
 * else the kernel's 15-character name.  0 or -errno. */
int pybpftune_prog_full_name(int prog_fd, char *name, size_t name_len);

/* The ABI revision of this extension; checked at import to catch stale builds. */
#define PYBPFTUNE_EXT_ABI ...

/* Python callbacks. */
extern "Python" void pybpftune_libbpf_log(int level, const char *line);
extern "Python" int pybpftune_ringbuf_event(void *ctx, void *data, size_t size);
