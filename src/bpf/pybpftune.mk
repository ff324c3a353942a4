# pybpftune.mk: compile a tuner's BPF source into the two variants the
# pybpftune daemon loads, with the flags pybpftune's own objects are built
# with (its Makefile includes this file too):
#
#   <name>.bpf.o         full variant: tp_btf, fentry and kprobe forms
#   <name>.bpf.legacy.o  -DBPFTUNE_LEGACY: raw_tp and kprobe forms only
#
# An outside tuner's Makefile:
#
#   PYTHON ?= python3
#   PYBPFTUNE_INCLUDE := $(shell $(PYTHON) -m pybpftune.build --include-dir)
#   include $(PYBPFTUNE_INCLUDE)/pybpftune.mk
#   all: my_tuner.bpf.o my_tuner.bpf.legacy.o
#
# The pattern rules below build <dir>/<name>.bpf.o and .bpf.legacy.o from
# <dir>/<name>.bpf.c; a Makefile with other paths calls
# $(call pybpftune_compile_bpf,SOURCE,OUTPUT,EXTRA_FLAGS) in its own rules.
#
# Variables (set before the include to override):
#   PYBPFTUNE_INCLUDE   directories holding pybpftune.bpf.h, bpftune_shared.h
#                       and vmlinux.h (required)
#   CLANG, LLVM_STRIP   the compiler and strip tool (clang, llvm-strip)
#   PYBPFTUNE_BPF_ARCH  the kernel's name of the target architecture (x86,
#                       arm64; from uname -m)
#   Q                   @ (quiet, the default) or empty (show the commands)

ifeq ($(strip $(PYBPFTUNE_INCLUDE)),)
$(error PYBPFTUNE_INCLUDE is empty: is pybpftune installed for this Python? ($(PYTHON) -m pybpftune.build --include-dir))
endif

CLANG ?= clang
LLVM_STRIP ?= llvm-strip
Q ?= @
PYBPFTUNE_BPF_ARCH ?= $(shell uname -m | sed -e 's/aarch64/arm64/' -e 's/x86_64/x86/')
PYBPFTUNE_BPF_CFLAGS := -g -O2 -target bpf -D__TARGET_ARCH_$(PYBPFTUNE_BPF_ARCH) -Wall -Werror \
                        -Wno-unused-function $(addprefix -I,$(PYBPFTUNE_INCLUDE))
PYBPFTUNE_BPF_HEADERS := $(wildcard $(addsuffix /*.h,$(PYBPFTUNE_INCLUDE)))

# Compile, then strip DWARF but keep BTF: CO-RE needs BTF, the installed
# object does not need the debug info.  A failed compile leaves no object.
define pybpftune_compile_bpf
	@echo "  BPF     $(2)"
	$(Q)$(CLANG) $(PYBPFTUNE_BPF_CFLAGS) $(3) -c $(1) -o $(2).tmp
	$(Q)$(LLVM_STRIP) -g $(2).tmp
	$(Q)mv $(2).tmp $(2)
endef

%.bpf.o: %.bpf.c $(PYBPFTUNE_BPF_HEADERS)
	$(call pybpftune_compile_bpf,$<,$@,)
%.bpf.legacy.o: %.bpf.c $(PYBPFTUNE_BPF_HEADERS)
	$(call pybpftune_compile_bpf,$<,$@,-DBPFTUNE_LEGACY)
