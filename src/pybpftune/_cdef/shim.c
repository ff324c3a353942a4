/* C side of the extension: libbpf print routing and BTF global lookup.
 * build_ffi.py prepends the ABI and version defines. */

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/types.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>
#include <bpf/btf.h>
#include "bpftune_shared.h"

#if LIBBPF_MAJOR_VERSION < PYBPFTUNE_MIN_LIBBPF_MAJOR
#error "pybpftune needs libbpf >= 1.0"
#endif

static void pybpftune_libbpf_log(int level, const char *line);

static int pybpftune_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	char line[4096];
	va_list again;
	int n;

	va_copy(again, ap);
	n = vsnprintf(line, sizeof(line), fmt, ap);
	if (n >= (int)sizeof(line)) {
		/* A verifier log arrives as one message of up to megabytes; its
		 * last lines say why a program was refused, so keep all of it. */
		char *big = malloc((size_t)n + 1);

		if (big) {
			vsnprintf(big, (size_t)n + 1, fmt, again);
			va_end(again);
			pybpftune_libbpf_log((int)level, big);
			free(big);
			return 0;
		}
	}
	va_end(again);
	pybpftune_libbpf_log((int)level, line);
	return 0;
}

static void pybpftune_install_print(void)
{
	libbpf_set_print(pybpftune_print);
}

static int pybpftune_find_global(struct bpf_object *obj, const char *name, char *section,
				 size_t section_len, unsigned int *offset, unsigned int *size)
{
	const struct btf *btf = bpf_object__btf(obj);
	__u32 id, n;

	if (!btf)
		return -ENOENT;
	n = btf__type_cnt(btf);
	for (id = 1; id < n; id++) {
		const struct btf_type *t = btf__type_by_id(btf, id);
		const struct btf_var_secinfo *vsi;
		__u16 i, vlen;

		if (!btf_is_datasec(t))
			continue;
		vsi = btf_var_secinfos(t);
		vlen = btf_vlen(t);
		for (i = 0; i < vlen; i++, vsi++) {
			const struct btf_type *var = btf__type_by_id(btf, vsi->type);

			if (strcmp(btf__name_by_offset(btf, var->name_off), name))
				continue;
			snprintf(section, section_len, "%s", btf__name_by_offset(btf, t->name_off));
			*offset = vsi->offset;
			*size = vsi->size;
			return 0;
		}
	}
	return -ENOENT;
}

/* A loaded program's full name: the name of its main function in the BTF the
 * kernel kept for it (what bpftool prints), else the kernel's own name, which
 * is cut at 15 characters.  0 or -errno. */
static int pybpftune_prog_full_name(int prog_fd, char *name, size_t name_len)
{
	struct bpf_prog_info info;
	struct bpf_func_info func = {};
	__u32 len = sizeof(info), btf_id;
	const struct btf_type *t;
	struct btf *btf;

	memset(&info, 0, sizeof(info));
	if (bpf_obj_get_info_by_fd(prog_fd, &info, &len))
		return -errno;
	snprintf(name, name_len, "%s", info.name);
	if (!info.btf_id || !info.nr_func_info || info.func_info_rec_size != sizeof(func))
		return 0;
	btf_id = info.btf_id;
	memset(&info, 0, sizeof(info));
	info.nr_func_info = 1;
	info.func_info_rec_size = sizeof(func);
	info.func_info = (__u64)(unsigned long)&func;
	len = sizeof(info);
	if (bpf_obj_get_info_by_fd(prog_fd, &info, &len))
		return 0;
	btf = btf__load_from_kernel_by_id(btf_id);
	if (!btf)
		return 0;
	t = btf__type_by_id(btf, func.type_id);
	if (t && btf_is_func(t))
		snprintf(name, name_len, "%s", btf__name_by_offset(btf, t->name_off));
	btf__free(btf);
	return 0;
}
