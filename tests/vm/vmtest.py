#!/usr/bin/env python3
"""Run one command as root inside a stock Debian kernel booted under qemu.

    python3 tests/vm/vmtest.py --kernel 6.1 [--timeout SECS] [--mem 2G] -- CMD ARGS...

The host kernel that pybpftune is developed on refuses fentry and has no kprobes, so
the kernel-dependent tests run inside real distribution kernels instead.  This module

1. resolves a kernel alias (``6.1``, ``5.10``, ``6.12``) or a full Debian package name
   to a concrete ``linux-image-*`` package, with a private apt configuration so the
   machine's own apt sources are never touched;
2. downloads it with ``apt-get download``, unpacks it with ``dpkg -x`` and caches the
   tree, an uncompressed ``vmlinux`` and a tiny busybox initramfs, keyed by package
   version, under ``${PYBPFTUNE_VM_CACHE:-~/.cache/pybpftune/vm}``;
3. boots it under qemu (TCG by default), with the host root shared read-only (9p plus a
   tmpfs overlay) and the current directory shared read-write at the same path, runs
   CMD there with the caller's environment, streams its stdout and stderr back live and
   exits with its exit code.

Exit codes of the runner itself (the command's own code is passed through otherwise):
124 the command timed out, 125 the VM or harness failed (kernel did not boot, qemu
error), 126 the kernel package could not be found or downloaded, 2 usage error.
See tests/vm/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_VM = 125
EXIT_KERNEL = 126
EXIT_INTERRUPTED = 130

# Kernel aliases: the version line and the Debian release whose linux-image-amd64
# metapackage points at the current image of that line.
ALIASES: dict[str, str] = {"5.10": "bullseye", "6.1": "bookworm", "6.12": "trixie"}
CODENAMES: tuple[str, ...] = ("bookworm", "bullseye", "trixie")

# Modules the initramfs needs to reach the shares; optional ones are loaded if present.
INITRAMFS_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p", "overlay")
OPTIONAL_MODULES: tuple[str, ...] = ("virtio_rng",)

# Variables of the caller's environment that are not handed to the guest.
ENV_SKIP = frozenset({"PWD", "OLDPWD", "SHLVL", "_", "SHELLOPTS", "BASHOPTS", "PS1", "PS2", "PROMPT_COMMAND"})

# Used only when neither the environment nor the host's apt sources name a mirror.
FALLBACK_MIRROR = "http://deb.debian.org/debian"

REFRESH_HOURS_DEFAULT = 24.0
POLL_SECONDS = 0.05


class VMError(Exception):
    """A failure reported as one line on stderr and a distinct exit code."""

    def __init__(self, code: int, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Kernel:
    """An unpacked kernel package in the cache, ready to boot."""

    package: str
    version: str
    release: str  # uname -r
    root: Path  # the dpkg -x tree (boot/, lib/modules/)
    directory: Path  # cache directory of this package version (derived artifacts live here)

    @property
    def image(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def moddir(self) -> Path:
        return self.root / "lib" / "modules" / self.release


# --------------------------------------------------------------------------- cache + apt


def cache_dir() -> Path:
    env = os.environ.get("PYBPFTUNE_VM_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return (Path.home() / ".cache" / "pybpftune" / "vm").resolve()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise concurrent runs that fill the same cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _apt_source_texts() -> list[str]:
    texts: list[str] = []
    files = [Path("/etc/apt/sources.list")]
    parts = Path("/etc/apt/sources.list.d")
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    for f in files:
        with contextlib.suppress(OSError):
            texts.append("\n".join(ln for ln in f.read_text().splitlines() if not ln.lstrip().startswith("#")))
    return texts


def mirrors() -> tuple[str, str]:
    """(archive URI, security URI): from PYBPFTUNE_VM_MIRROR*, else the host's apt sources."""
    main = os.environ.get("PYBPFTUNE_VM_MIRROR", "").rstrip("/")
    security = os.environ.get("PYBPFTUNE_VM_SECURITY_MIRROR", "").rstrip("/")
    texts = _apt_source_texts()
    for text in texts:
        if not main:
            m = re.search(r"((?:https?|ftp)://\S+/debian)/?(?=\s|$)", text, re.M)
            main = m.group(1) if m else ""
        if not security:
            m = re.search(r"((?:https?|ftp)://\S+/debian-security)/?(?=\s|$)", text, re.M)
            security = m.group(1) if m else ""
    main = main or FALLBACK_MIRROR
    return main, security or main + "-security"


class Apt:
    """apt-get/apt-cache for one Debian release with a private configuration in the cache."""

    def __init__(self, codename: str, cache: Path) -> None:
        self.codename = codename
        self.root = cache / "apt" / codename
        self.sources = self.root / "sources.list"
        self.stamp = self.root / "updated"

    def options(self) -> list[str]:
        return [
            "-o", f"Dir::Etc::SourceList={self.sources}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", "Dir::Etc::Preferences=/dev/null",
            "-o", "Dir::Etc::PreferencesParts=/dev/null",
            "-o", f"Dir::State::Lists={self.root / 'lists'}",
            "-o", f"Dir::Cache={self.root / 'cache'}",
            "-o", "Dir::State::status=/dev/null",
            "-o", "APT::Architecture=amd64",
            "-o", "APT::Architectures=amd64",
            "-o", "Acquire::Languages=none",
            "-o", "APT::Sandbox::User=root",
            "-o", "Debug::NoLocking=1",
        ]  # fmt: skip

    def _write_sources(self) -> None:
        main, security = mirrors()
        keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
        opt = f"[signed-by={keyring}] " if keyring.is_file() else ""
        c = self.codename
        text = f"deb {opt}{main} {c} main\ndeb {opt}{main} {c}-updates main\ndeb {opt}{security} {c}-security main\n"
        for d in ("lists/partial", "cache/archives/partial"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        if not self.sources.is_file() or self.sources.read_text() != text:
            self.sources.write_text(text)
            self.stamp.unlink(missing_ok=True)

    def fresh(self, max_age_hours: float) -> bool:
        try:
            return time.time() - self.stamp.stat().st_mtime < max_age_hours * 3600
        except OSError:
            return False

    def update(self, max_age_hours: float) -> None:
        self._write_sources()
        if self.fresh(max_age_hours):
            return
        r = _run_apt(["apt-get", *self.options(), "-q", "update"])
        # apt-get update exits 0 even when a source failed (only a warning says so).  A missing
        # -updates or -security suite is tolerable; a missing release suite is not.
        problems = [ln for ln in r.stdout.splitlines() if ln.startswith(("E:", "W: Failed"))]
        main_failed = any(f"/dists/{self.codename}/" in ln for ln in problems)
        if r.returncode != 0 or main_failed:
            first = problems[0] if problems else "apt-get update failed"
            raise VMError(
                EXIT_KERNEL, f"cannot fetch the Debian {self.codename} package lists from Debian's mirror: {first}"
            )
        self.stamp.touch()

    def show(self, package: str) -> dict[str, str] | None:
        r = _run_apt(["apt-cache", *self.options(), "show", "--no-all-versions", package])
        if r.returncode != 0:
            return None
        fields: dict[str, str] = {}
        for line in r.stdout.split("\n\n")[0].splitlines():
            key, sep, value = line.partition(":")
            if sep and not line.startswith(" "):
                fields[key] = value.strip()
        return fields if fields.get("Package") == package else None

    def download(self, package: str, version: str, dest: Path) -> Path:
        r = _run_apt(["apt-get", *self.options(), "-q", "download", f"{package}={version}"], cwd=dest)
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if r.returncode != 0 or not debs:
            last = [ln for ln in r.stdout.splitlines() if ln.startswith("E:")] or ["apt-get download failed"]
            raise VMError(EXIT_KERNEL, f"cannot download {package} {version} from Debian's mirror: {last[-1]}")
        return debs[0]


def _run_apt(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env={**os.environ, "LC_ALL": "C"}, check=False,
        )  # fmt: skip
    except FileNotFoundError as exc:
        raise VMError(EXIT_KERNEL, f"{argv[0]} not found: run on Debian or install apt") from exc


def _suites_for(package: str) -> list[str]:
    """Which Debian releases to search for a full package name (most likely first)."""
    m = re.match(r"linux-image-(\d+\.\d+)\.", package)
    if m and m.group(1) in ALIASES:
        return [ALIASES[m.group(1)]]
    return list(CODENAMES)


def _refresh_hours() -> float:
    try:
        return float(os.environ.get("PYBPFTUNE_VM_REFRESH_HOURS", REFRESH_HOURS_DEFAULT))
    except ValueError:
        return REFRESH_HOURS_DEFAULT


def _offline() -> bool:
    return os.environ.get("PYBPFTUNE_VM_OFFLINE", "") == "1"


def _cached_versions(cache: Path, package: str) -> list[Path]:
    kdir = cache / "kernels"
    found = [d for d in kdir.glob(f"{package}_*") if (d / "kernel.json").is_file()] if kdir.is_dir() else []
    return sorted(found, key=lambda d: d.stat().st_mtime, reverse=True)


def resolve(spec: str, cache: Path, log: BinaryIO | None = None) -> tuple[str, str, str]:
    """Kernel alias or package name -> (codename, package, version)."""
    memo = cache / "resolved.json"
    known: dict[str, dict[str, object]] = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(memo.read_text())
    entry = known.get(spec)
    max_age = _refresh_hours()

    def from_memo() -> tuple[str, str, str] | None:
        if not entry:
            return None
        c, p, v = str(entry.get("codename")), str(entry.get("package")), str(entry.get("version"))
        return (c, p, v) if (cache / "kernels" / _key(p, v) / "kernel.json").is_file() else None

    memo_hit = from_memo()
    age = time.time() - float(str(entry.get("time", 0))) if entry else float("inf")
    if memo_hit and (_offline() or age < max_age * 3600):
        return memo_hit
    if _offline():
        raise VMError(EXIT_KERNEL, f"kernel {spec!r} is not in the cache {cache} and PYBPFTUNE_VM_OFFLINE=1")

    if spec in ALIASES:
        codenames, wanted = [ALIASES[spec]], "linux-image-amd64"
    elif re.fullmatch(r"linux-image-[A-Za-z0-9.+~-]+", spec):
        codenames, wanted = _suites_for(spec), spec
    else:
        raise VMError(
            EXIT_USAGE,
            f"unknown kernel {spec!r}: use one of {', '.join(ALIASES)}"
            " or a package name like linux-image-6.1.0-56-amd64",
        )

    result: tuple[str, str, str] | None = None
    try:
        for codename in codenames:
            apt = Apt(codename, cache)
            apt.update(max_age)
            fields = apt.show(wanted)
            if fields is None:
                continue
            if wanted == "linux-image-amd64":
                dep = fields.get("Depends", "").split(",")[0].split()[0] if fields.get("Depends") else ""
                target = apt.show(dep) if dep else None
                if target is None:
                    raise VMError(
                        EXIT_KERNEL, f"cannot resolve linux-image-amd64 of Debian {codename} (depends {dep!r})"
                    )
                fields = target
            result = (codename, fields["Package"], fields["Version"])
            break
    except VMError as exc:
        if memo_hit:  # mirror unreachable: keep using the kernel we already have
            return memo_hit
        raise VMError(exc.code, f"cannot look up kernel package {spec}: {exc.message}") from exc
    if result is None:
        if memo_hit:
            return memo_hit
        where = " or ".join(f"Debian {c}" for c in codenames)
        raise VMError(EXIT_KERNEL, f"kernel package {wanted} not found in {where}")
    if spec in ALIASES and not result[2].startswith(spec + "."):
        raise VMError(EXIT_KERNEL, f"Debian {result[0]} now ships {result[1]} {result[2]}, not a {spec} kernel")
    known[spec] = {"codename": result[0], "package": result[1], "version": result[2], "time": time.time()}
    tmp = memo.with_suffix(f".{os.getpid()}")
    tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
    tmp.replace(memo)
    if log:
        log.write(f"vmtest: {spec} -> {result[1]} {result[2]} (Debian {result[0]})\n".encode())
    return result


def _key(package: str, version: str) -> str:
    return f"{package}_{version.replace(':', '%3a')}"


def fetch(codename: str, package: str, version: str, cache: Path, log: BinaryIO | None = None) -> Kernel:
    """Download and unpack a kernel package once; later calls only read the cache."""
    directory = cache / "kernels" / _key(package, version)
    meta = directory / "kernel.json"
    if not meta.is_file():
        if log:
            log.write(f"vmtest: downloading {package} {version} (Debian {codename})\n".encode())
        with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmpdir:
            tmp = Path(tmpdir)
            apt = Apt(codename, cache)
            apt.update(_refresh_hours())
            deb = apt.download(package, version, tmp)
            stage = tmp / "pkg"
            root = stage / "root"
            root.mkdir(parents=True)
            r = subprocess.run(["dpkg", "-x", str(deb), str(root)], capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise VMError(EXIT_KERNEL, f"cannot unpack {deb.name}: {r.stderr.strip()}")
            if not (root / "lib").exists() and (root / "usr" / "lib" / "modules").is_dir():
                (root / "lib").symlink_to("usr/lib")  # merged-/usr packages (trixie and later)
            releases = [d.name for d in (root / "lib" / "modules").glob("*") if d.is_dir()]
            if len(releases) != 1 or not (root / "boot" / f"vmlinuz-{releases[0]}").is_file():
                raise VMError(EXIT_KERNEL, f"{package} does not look like a kernel image package")
            release = releases[0]
            r = subprocess.run(["depmod", "-b", str(root), release], capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise VMError(EXIT_VM, f"depmod failed for {package}: {r.stderr.strip()}")
            info = {"package": package, "version": version, "release": release, "codename": codename}
            (stage / "kernel.json").write_text(json.dumps(info, indent=1) + "\n")
            directory.parent.mkdir(parents=True, exist_ok=True)
            if directory.exists():
                shutil.rmtree(directory)
            stage.rename(directory)
    info = json.loads(meta.read_text())
    os.utime(directory)
    return Kernel(package, version, str(info["release"]), directory / "root", directory)


def prepare(spec: str, log: BinaryIO | None = None) -> Kernel:
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with locked(cache / ".lock"):
        codename, package, version = resolve(spec, cache, log)
        return fetch(codename, package, version, cache, log)


# --------------------------------------------------------------------------- vmlinux (PVH)


def _elf_has_pvh_note(data: bytes) -> bool:
    """True if data is an x86-64 ELF with a XEN_ELFNOTE_PHYS32_ENTRY note (PVH entry point)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _decompress(payload: bytes) -> bytes | None:
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        if payload.startswith(b"\x1f\x8b"):
            return zlib.decompressobj(wbits=31).decompress(payload)
        if payload.startswith(b"\x5d\x00\x00"):
            return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
        tools = {b"\x28\xb5\x2f\xfd": ["zstd", "-qdc"], b"\x02\x21\x4c\x18": ["lz4", "-dc"]}
        for magic, argv in tools.items():
            if payload.startswith(magic) and shutil.which(argv[0]):
                r = subprocess.run(argv, input=payload, capture_output=True, check=False)
                return r.stdout or None
    except (lzma.LZMAError, zlib.error, EOFError):
        return None
    return None


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage, if it has a PVH entry; None otherwise."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    setup_sects = bzimage[0x1F1] or 4
    start = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    elf = _decompress(bzimage[start + offset : start + offset + length]) if length else None
    return elf if elf and _elf_has_pvh_note(elf) else None


def boot_image(kernel: Kernel) -> Path:
    """Prefer the uncompressed vmlinux (booted via PVH: no in-guest decompression)."""
    if os.environ.get("PYBPFTUNE_VM_PVH", "1") == "0":
        return kernel.image
    vmlinux, none = kernel.directory / "vmlinux", kernel.directory / "vmlinux.none"
    if not vmlinux.is_file() and not none.exists():
        elf = extract_vmlinux(kernel.image.read_bytes())
        if elf is None:
            none.touch()
        else:
            tmp = vmlinux.with_suffix(f".{os.getpid()}")
            tmp.write_bytes(elf)
            tmp.replace(vmlinux)
    return vmlinux if vmlinux.is_file() else kernel.image


# --------------------------------------------------------------------------- initramfs

INIT_SCRIPT = r"""#!/bin/busybox sh
# pybpftune vmtest stage 1: load the share drivers, build the root, hand over to the job.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /job /lower /ovl /r
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "vmtest-init: $*"; poweroff -f; sleep 5; }
for m in $(cat /mods/order); do insmod "/mods/$m" || fail "insmod $m failed"; done
for m in $(cat /mods/optional); do insmod "/mods/$m" 2>/dev/null; done
o=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $o job /job || fail "cannot mount the job share"
. /job/params
mount -t 9p -o ro,$o,cache=loose hostroot /lower || fail "cannot mount the host root"
mount -t tmpfs -o mode=755 ovl /ovl && mkdir /ovl/u /ovl/w
mount -t overlay -o lowerdir=/lower,upperdir=/ovl/u,workdir=/ovl/w overlay /r || fail "overlay failed"
R=/r
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=755 run $R/run
mkdir -p $R/run/vmtest
mount --bind /job $R/run/vmtest
mount -t bpf -o mode=700 bpf $R/sys/fs/bpf
# With systemd as PID 1 (--init systemd), systemd mounts the cgroup tree itself.
if [ "$VMTEST_INIT" != systemd ]; then
  if [ "$VMTEST_CG2" != /sys/fs/cgroup ]; then
    mount -t tmpfs -o mode=755 cgroup $R/sys/fs/cgroup
    mkdir -p "$R$VMTEST_CG2"
  fi
  mount -t cgroup2 -o nsdelegate cgroup2 "$R$VMTEST_CG2" || mount -t cgroup2 cgroup2 "$R$VMTEST_CG2"
fi
mount -t tracefs tracefs $R/sys/kernel/tracing
mount -t debugfs debugfs $R/sys/kernel/debug
mkdir -p "$R$VMTEST_CWD"
mount -t 9p -o $o,cache=loose cwd "$R$VMTEST_CWD" || fail "cannot mount $VMTEST_CWD"
mkdir -p "$R/lib/modules/$VMTEST_KREL"
mount --bind "/lower$VMTEST_MODDIR" "$R/lib/modules/$VMTEST_KREL"
ip link set lo up
hostname vmtest
mkdir -p $R/dev/virtio-ports
for p in /sys/class/virtio-ports/*; do ln -sf "../${p##*/}" "$R/dev/virtio-ports/$(cat "$p/name")"; done
exec switch_root $R /bin/sh /run/vmtest/stage2
"""


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 0, rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One record of a newc cpio archive (the kernel's initramfs format)."""
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def build_cpio(files: Sequence[tuple[str, int, bytes]], devices: Sequence[tuple[str, int, int, int]] = ()) -> bytes:
    """files: (path, mode, data), with directories as mode 0o040xxx; devices: (path, mode, major, minor)."""
    out = bytearray()
    ino = 1
    for path, mode, data in files:
        out += _cpio_entry(path, mode, data, ino)
        ino += 1
    for path, mode, major, minor in devices:
        out += _cpio_entry(path, mode, b"", ino, (major, minor))
        ino += 1
    out += _cpio_entry("TRAILER!!!", 0)
    return bytes(out)


def _module_files(moddir: Path) -> tuple[dict[str, str], dict[str, list[str]], set[str]]:
    """Name -> path, path -> dependencies, built-in names (names use underscores)."""

    def norm(path: str) -> str:
        return re.sub(r"\.ko(\.(xz|zst|gz))?$", "", path.rsplit("/", 1)[-1]).replace("-", "_")

    paths: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        paths[norm(mod)] = mod
        deps[mod] = rest.split()
    builtin: set[str] = set()
    with contextlib.suppress(OSError):
        builtin = {norm(ln) for ln in (moddir / "modules.builtin").read_text().split()}
    return paths, deps, builtin


def _load_order(names: Sequence[str], moddir: Path, required: bool) -> list[str]:
    paths, deps, builtin = _module_files(moddir)
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in names:
        if name in paths:
            visit(paths[name])
        elif required and name not in builtin:
            raise VMError(EXIT_VM, f"kernel in {moddir} has no {name} module (needed to boot the VM)")
    return order


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix in (".xz", ".zst", ".gz"):
        out = _decompress(data)
        if out is None:
            raise VMError(EXIT_VM, f"cannot decompress {path}")
        return out
    return data


def build_initramfs(kernel: Kernel) -> Path:
    busybox = shutil.which("busybox")
    if busybox is None:
        raise VMError(EXIT_VM, "busybox not found (apt-get install busybox-static)")
    bb = Path(busybox).read_bytes()
    if not _is_static(Path(busybox)):
        raise VMError(EXIT_VM, f"{busybox} is not statically linked (apt-get install busybox-static)")
    required = _load_order(INITRAMFS_MODULES, kernel.moddir, True)
    optional = [p for p in _load_order(OPTIONAL_MODULES, kernel.moddir, False) if p not in required]
    digest = hashlib.sha256(INIT_SCRIPT.encode() + bb + "\n".join(required + optional).encode()).hexdigest()[:12]
    target = kernel.directory / f"initramfs-{digest}.cpio"
    if target.is_file():
        return target
    files: list[tuple[str, int, bytes]] = [
        ("bin", 0o040755, b""), ("dev", 0o040755, b""), ("mods", 0o040755, b""),
        ("bin/busybox", 0o100755, bb), ("init", 0o100755, INIT_SCRIPT.encode()),
    ]  # fmt: skip
    for group, paths in (("order", required), ("optional", optional)):
        names: list[str] = []
        for rel in paths:
            base = re.sub(r"\.(xz|zst|gz)$", "", rel.rsplit("/", 1)[-1])
            files.append((f"mods/{base}", 0o100644, _module_bytes(kernel.moddir / rel)))
            names.append(base)
        files.append((f"mods/{group}", 0o100644, "".join(n + "\n" for n in names).encode()))
    # Uncompressed on purpose: unpacking gzip in an emulated CPU costs more than copying.
    data = build_cpio(files, [("dev/console", 0o020600, 5, 1), ("dev/null", 0o020666, 1, 3)])
    for old in kernel.directory.glob("initramfs-*.cpio"):
        old.unlink(missing_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def _is_static(path: Path) -> bool:
    """An ELF without a PT_INTERP program header needs no dynamic loader."""
    data = path.read_bytes()[:65536]
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


# --------------------------------------------------------------------------- running


def _cgroup2_mountpoint() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2" and parts[1].startswith("/sys/fs/cgroup"):
                return parts[1]
    return "/sys/fs/cgroup"


def guest_environment(environ: dict[str, str], kernel: Kernel) -> str:
    """The caller's environment as a sh script of exports."""
    lines = []
    for name, value in sorted(environ.items()):
        if name in ENV_SKIP or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            continue
        lines.append(f"export {name}={shlex.quote(value)}\n")
    lines.append(f"export PYBPFTUNE_VM=1 PYBPFTUNE_VM_KERNEL={shlex.quote(kernel.release)}\n")
    return "".join(lines)


def job_script(cwd: str, argv: Sequence[str]) -> str:
    """Run the command, report its code, power off."""
    return (
        "#!/bin/sh\n"
        ". /run/vmtest/env\n"
        ": > /run/vmtest/started\n"
        f"( cd {shlex.quote(cwd)} && exec {shlex.join(argv)} ) "
        "</dev/null >/dev/virtio-ports/out 2>/dev/virtio-ports/err\n"
        "rc=$?\n"
        "sync\n"
        'echo "$rc" > /run/vmtest/rc.tmp && mv /run/vmtest/rc.tmp /run/vmtest/rc\n'
        "echo o > /proc/sysrq-trigger\n"
        "sleep 60\n"
    )


# --init systemd: the job runs as a oneshot service once basic.target is up
# (journald, sockets, sysinit), as a service an operator starts would see it.
SYSTEMD_UNITS = {
    "vmtest.target": (
        "[Unit]\nDescription=vmtest: the job under systemd\nRequires=vmtest.service\n"
        "After=vmtest.service\nAllowIsolate=yes\n"
    ),
    "vmtest.service": (
        "[Unit]\nDescription=vmtest job\n[Service]\nType=oneshot\nExecStart=/bin/sh /run/vmtest/job\n"
        "TimeoutStartSec=infinity\n"
    ),
}
# Units a qemu guest without real disks or consoles has no use for (and that
# cost seconds of emulated CPU).
SYSTEMD_MASKED = (
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-timesyncd.service",
    "systemd-pstore.service",
    "e2scrub_reap.service",
    "systemd-random-seed.service",
    "systemd-firstboot.service",
    "systemd-machine-id-commit.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
)


def stage2_script(cwd: str, argv: Sequence[str], init: str = "sh") -> str:
    """Stage 2 runs as PID 1 in the final root: the job itself, or (``init``
    "systemd") write the job's units and become systemd."""
    if init != "systemd":
        return job_script(cwd, argv)
    lines = ["#!/bin/sh\n", "mkdir -p /etc/systemd/system\n"]
    for name, text in SYSTEMD_UNITS.items():
        lines.append(f"printf '%s' {shlex.quote(text)} > /etc/systemd/system/{name}\n")
    lines += [f"ln -sf /dev/null /etc/systemd/system/{name}\n" for name in SYSTEMD_MASKED]
    lines.append("exec /lib/systemd/systemd --unit=vmtest.target --show-status=false\n")
    return "".join(lines)


def _qarg(value: str) -> str:
    """Escape a value for a qemu -option key=value list."""
    return value.replace(",", ",,")


def qemu_command(kernel: Kernel, image: Path, initrd: Path, job: Path, cwd: str, mem: str, cpus: int) -> list[str]:
    accel = os.environ.get("PYBPFTUNE_VM_ACCEL", "tcg")
    if accel == "kvm":
        acc = ["-accel", "kvm", "-cpu", os.environ.get("PYBPFTUNE_VM_CPU", "host")]
    else:
        acc = ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", os.environ.get("PYBPFTUNE_VM_CPU", "max")]
    append = "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init tsc=reliable mitigations=off"
    append += " random.trust_cpu=on " + os.environ.get("PYBPFTUNE_VM_APPEND", "")
    cmd = [
        os.environ.get("PYBPFTUNE_VM_QEMU", "qemu-system-x86_64"),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        *acc, "-M", "q35", "-m", mem, "-smp", str(cpus),
        "-kernel", str(image), "-initrd", str(initrd), "-append", append.strip(),
        "-serial", f"file:{_qarg(str(job / 'console.log'))}", "-monitor", "none",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip
    for tag, path, extra in (("hostroot", "/", ",readonly=on"), ("cwd", cwd, ""), ("job", str(job / "share"), "")):
        cmd += [
            "-fsdev", f"local,id={tag},path={_qarg(path)},security_model=none,multidevs=remap{extra}",
            "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}",
        ]  # fmt: skip
    cmd += ["-device", "virtio-serial-pci"]
    for name in ("out", "err"):
        cmd += [
            "-chardev", f"file,id={name},path={_qarg(str(job / name))}",
            "-device", f"virtserialport,chardev={name},name={name}",
        ]  # fmt: skip
    cmd += shlex.split(os.environ.get("PYBPFTUNE_VM_QEMU_OPTS", ""))
    return cmd


class _Tail:
    """Copies what a growing file gains to a stream."""

    def __init__(self, path: Path, sink: BinaryIO | None) -> None:
        self.path, self.sink, self.pos = path, sink, 0

    def pump(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.pos)
                data = fh.read()
        except FileNotFoundError:
            return 0
        if data:
            self.pos += len(data)
            if self.sink is not None:
                self.sink.write(data)
                self.sink.flush()
        return len(data)


def _die_with_parent() -> None:
    """In the qemu child: get SIGKILL if the runner dies, so no VM outlives a killed run."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail_lines(path: Path, n: int) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


def run(
    argv: Sequence[str],
    kernel_spec: str = "6.1",
    timeout: float = 600.0,
    boot_timeout: float = 180.0,
    mem: str = "2G",
    cpus: int = 2,
    verbose: bool = False,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
    cwd: str | None = None,
    environ: dict[str, str] | None = None,
    init: str = "sh",
) -> int:
    """Boot kernel_spec, run argv in cwd as root, stream its output, return its exit code.

    ``init`` "systemd" boots the host's systemd as PID 1 and runs argv as a
    service of it (after basic.target); "sh" (default) runs argv as PID 1.

    timeout counts from the moment the command starts; boot_timeout bounds the boot before it.

    Raises VMError for the runner's own failures (timeout, boot failure, missing kernel).
    """
    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr.buffer
    cwd = os.path.realpath(cwd or Path.cwd())
    if cwd == "/":
        raise VMError(EXIT_USAGE, "run from a directory other than / (the current directory is shared read-write)")
    if not argv:
        raise VMError(EXIT_USAGE, "no command given (usage: vmtest.py --kernel 6.1 -- CMD ARGS...)")
    qemu = os.environ.get("PYBPFTUNE_VM_QEMU", "qemu-system-x86_64")
    if shutil.which(qemu) is None:
        raise VMError(EXIT_VM, f"{qemu} not found (apt-get install qemu-system-x86)")
    log = err if verbose else None
    kernel = prepare(kernel_spec, log)
    with locked(kernel.directory.parent / f".{kernel.directory.name}.lock"):
        image = boot_image(kernel)
        initrd = build_initramfs(kernel)

    with tempfile.TemporaryDirectory(prefix="pybpftune-vm-") as tmpdir:
        job = Path(tmpdir)
        share = job / "share"
        share.mkdir()
        (share / "params").write_text(
            f"VMTEST_CWD={shlex.quote(cwd)}\n"
            f"VMTEST_KREL={shlex.quote(kernel.release)}\n"
            f"VMTEST_MODDIR={shlex.quote(str(kernel.moddir))}\n"
            f"VMTEST_CG2={shlex.quote(_cgroup2_mountpoint())}\n"
            f"VMTEST_INIT={shlex.quote(init)}\n"
        )
        (share / "env").write_text(guest_environment(dict(environ if environ is not None else os.environ), kernel))
        if init == "systemd" and not Path("/lib/systemd/systemd").exists():
            raise VMError(EXIT_VM, "--init systemd: /lib/systemd/systemd is not installed (apt-get install systemd)")
        (share / "stage2").write_text(stage2_script(cwd, argv, init))
        (share / "job").write_text(job_script(cwd, argv))
        for name in ("out", "err", "console.log"):
            (job / name).touch()
        cmd = qemu_command(kernel, image, initrd, job, cwd, mem, cpus)
        if verbose:
            err.write(f"vmtest: booting {kernel.release} ({kernel.package} {kernel.version}) from {image}\n".encode())
            err.write(("vmtest: " + shlex.join(cmd) + "\n").encode())
            err.flush()
        start = time.monotonic()
        with open(job / "qemu.err", "wb") as qemu_err:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=qemu_err,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        tails = [_Tail(job / "out", out), _Tail(job / "err", err)]
        console = _Tail(job / "console.log", err if verbose else None)
        started: float | None = None
        timed_out = False
        try:
            while True:
                moved = sum(t.pump() for t in tails) + console.pump()
                if started is None and (share / "started").exists():
                    started = time.monotonic() - start
                    if verbose:
                        err.write(f"vmtest: guest ready after {started:.1f}s, running {shlex.join(argv)}\n".encode())
                        err.flush()
                if proc.poll() is not None:
                    break
                elapsed = time.monotonic() - start
                if elapsed > (boot_timeout if started is None else started + timeout):
                    timed_out = True
                    break
                if not moved:
                    time.sleep(POLL_SECONDS)
        finally:
            _stop(proc)
        for t in (*tails, console):
            t.pump()
        rc_file = share / "rc"
        if rc_file.is_file() and not timed_out:
            try:
                return int(rc_file.read_text().strip())
            except ValueError:
                pass
        detail = ""
        if verbose:
            detail = "\n".join(
                s for s in (_tail_lines(job / "console.log", 30), _tail_lines(job / "qemu.err", 10)) if s
            )
        if timed_out and started is not None:
            raise VMError(EXIT_TIMEOUT, f"timeout: {shlex.join(argv)} did not finish within {timeout:g}s", detail)
        qemu_line = _tail_lines(job / "qemu.err", 1).strip()
        what = f"kernel {kernel.release}"
        if timed_out:
            raise VMError(EXIT_VM, f"VM failure: {what} did not boot to the command within {boot_timeout:g}s", detail)
        if started is None:
            reason = f"qemu exited with {proc.returncode}: {qemu_line}" if qemu_line else "the guest stopped"
            hint = "" if verbose else " (rerun with --verbose to see the console)"
            raise VMError(EXIT_VM, f"VM failure: {what} did not boot to the command: {reason}{hint}", detail)
        raise VMError(EXIT_VM, f"VM failure: {what} stopped without reporting the command's exit code", detail)


# --------------------------------------------------------------------------- CLI


def unavailable_reason(kernel_spec: str = "6.1") -> str | None:
    """Why the VM tests cannot run here (None if they can), without downloading anything."""
    qemu = os.environ.get("PYBPFTUNE_VM_QEMU", "qemu-system-x86_64")
    for tool, pkg in ((qemu, "qemu-system-x86"), ("busybox", "busybox-static"), ("dpkg", "dpkg"),
                      ("apt-get", "apt"), ("depmod", "kmod")):  # fmt: skip
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install {pkg})"
    cache = cache_dir()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        entry = json.loads((cache / "resolved.json").read_text()).get(kernel_spec)
        if entry and (cache / "kernels" / _key(entry["package"], entry["version"]) / "kernel.json").is_file():
            return None
    if _offline():
        return f"kernel {kernel_spec} not cached and PYBPFTUNE_VM_OFFLINE=1"
    url = urllib.parse.urlsplit(mirrors()[0])
    try:
        with socket.create_connection((url.hostname or "", url.port or 80), timeout=5):
            return None
    except OSError as exc:
        return f"Debian's mirror is unreachable and kernel {kernel_spec} is not cached ({exc})"


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmtest.py",
        description="Boot a stock Debian kernel under qemu and run CMD as root in the current directory.",
        epilog="Exit codes: CMD's own; 124 timeout; 125 VM failure; 126 kernel package not found or not downloadable.",
    )
    parser.add_argument("--kernel", default="6.1", help="6.1, 5.10, 6.12 or a package like linux-image-6.1.0-56-amd64")
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("PYBPFTUNE_VM_TIMEOUT", "600")),
        help="seconds the command may run, boot excluded (default 600, env PYBPFTUNE_VM_TIMEOUT)",
    )
    parser.add_argument("--boot-timeout", type=float,
                        default=float(os.environ.get("PYBPFTUNE_VM_BOOT_TIMEOUT", "180")),
                        help="seconds the kernel may take to reach the command (default 180)")  # fmt: skip
    parser.add_argument("--mem", default=os.environ.get("PYBPFTUNE_VM_MEM", "2G"), help="guest memory (default 2G)")
    parser.add_argument("--cpus", type=int, default=int(os.environ.get("PYBPFTUNE_VM_CPUS", "2")), help="vCPUs (2)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print the guest console and timings")
    parser.add_argument("--init", choices=("sh", "systemd"), default="sh",
                        help="PID 1 of the guest: sh runs CMD itself; systemd boots systemd and runs CMD as a "
                        "service after basic.target (default sh)")  # fmt: skip
    parser.add_argument("--prepare", action="store_true",
                        help="only download and cache the kernel; print 'PACKAGE VERSION RELEASE'")  # fmt: skip
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    ns = parser.parse_args(args)
    command = list(ns.command)
    if command and command[0] == "--":
        command = command[1:]
    err = sys.stderr.buffer
    try:
        if ns.prepare:
            kernel = prepare(ns.kernel, err if ns.verbose else None)
            with locked(kernel.directory.parent / f".{kernel.directory.name}.lock"):
                boot_image(kernel)
                build_initramfs(kernel)
            print(kernel.package, kernel.version, kernel.release)
            return 0
        if not command:
            parser.error("no command given")
        return run(command, ns.kernel, ns.timeout, ns.boot_timeout, ns.mem, ns.cpus, ns.verbose, init=ns.init)
    except VMError as exc:
        if exc.detail:
            err.write(exc.detail.encode(errors="replace") + b"\n")
        err.write(f"vmtest: {exc.message}\n".encode(errors="replace"))
        err.flush()
        return exc.code
    except KeyboardInterrupt:
        err.write(b"vmtest: interrupted\n")
        return EXIT_INTERRUPTED
    except OSError as exc:  # cache not writable, disk full, ...: still one line, no traceback
        err.write(f"vmtest: VM harness failure: {exc}\n".encode(errors="replace"))
        return EXIT_VM


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
