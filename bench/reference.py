#!/usr/bin/env python3
"""Oracle's bpftune from Debian's packages, runnable beside the system's libraries.

    python3 bench/reference.py            # fetch (once) and print the command line to run it
    python3 bench/reference.py --install  # inside a VM guest: also put its plugins where it looks

Debian ships bpftune 0.4 in sid (trixie has a 2025 git snapshot).  Its
libraries need a newer glibc than Debian 12's, so the packages it needs
(bpftune, libbpftune0, libbpf1, libc6, ...) are downloaded the ordinary way
(``apt-get download`` with a private apt configuration, as tests/vm/vmtest.py
does for kernels) and unpacked into a cache outside the tree; the command line
runs sid's dynamic loader with sid's libraries, so nothing on the machine
changes.  bpftune loads its tuner plugins from a compiled-in directory
(/usr/lib/x86_64-linux-gnu/bpftune/): ``--install`` copies them there, which
is refused outside a tests/vm/vmtest.py guest (whose root is a throwaway
overlay).  Nothing of bpftune is ever written into the repository.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.vm import vmtest

SUITE = "sid"
PACKAGES = (
    "bpftune",
    "libbpftune0",
    "libbpf1",
    "libc6",
    "libgcc-s1",
    "libcap2",
    "libnl-3-200",
    "libnl-route-3-200",
    "libelf1t64",
    "zlib1g",
    "libzstd1",
)
PLUGIN_DIR = Path("/usr/lib/x86_64-linux-gnu/bpftune")


class SidApt(vmtest.Apt):
    """sid has no -updates or -security suites."""

    def _write_sources(self) -> None:
        main, _security = vmtest.mirrors()
        keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
        opt = f"[signed-by={keyring}] " if keyring.is_file() else ""
        text = f"deb {opt}{main} {self.codename} main\n"
        for d in ("lists/partial", "cache/archives/partial"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        if not self.sources.is_file() or self.sources.read_text() != text:
            self.sources.write_text(text)
            self.stamp.unlink(missing_ok=True)


def fetch() -> Path:
    """The unpacked tree (cached under the VM cache, keyed by bpftune's version)."""
    cache = vmtest.cache_dir()
    apt = SidApt(SUITE, cache)
    with vmtest.locked(cache / ".lock"):
        apt.update(vmtest._refresh_hours())
        fields = apt.show("bpftune")
        if fields is None:
            raise SystemExit(f"reference.py: Debian {SUITE} has no bpftune package")
        version = fields["Version"]
        root = cache / "reference" / f"bpftune_{version.replace(':', '%3a')}"
        if (root / "usr" / "sbin" / "bpftune").is_file():
            return root
        tmp = root.with_name(root.name + f".{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "debs").mkdir(parents=True)
        r = subprocess.run(
            ["apt-get", *apt.options(), "-q", "download", *PACKAGES],
            cwd=tmp / "debs",
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            raise SystemExit(f"reference.py: apt-get download failed: {r.stdout[-400:]} {r.stderr[-400:]}")
        for deb in sorted((tmp / "debs").glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(tmp / "root")], check=True)
        shutil.rmtree(root, ignore_errors=True)
        (tmp / "root").rename(root)
        shutil.rmtree(tmp, ignore_errors=True)
        return root


def command(root: Path) -> list[str]:
    """argv prefix that runs this bpftune with its own loader and libraries."""
    libdir = root / "usr" / "lib" / "x86_64-linux-gnu"
    return [str(libdir / "ld-linux-x86-64.so.2"), "--library-path", str(libdir), str(root / "usr" / "sbin" / "bpftune")]


def install_plugins(root: Path) -> None:
    """Copy the tuner plugins to bpftune's compiled-in directory (VM guests only)."""
    if os.environ.get("PYBPFTUNE_VM") != "1":
        raise SystemExit(f"reference.py: --install writes {PLUGIN_DIR}; it is only done inside a vmtest.py guest")
    PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
    for so in sorted((root / PLUGIN_DIR.relative_to("/")).glob("*_tuner.so")):
        shutil.copy2(so, PLUGIN_DIR / so.name)
        os.chmod(PLUGIN_DIR / so.name, 0o644)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help="also install the plugins (inside a VM guest only)")
    ns = parser.parse_args()
    root = fetch()
    if ns.install:
        install_plugins(root)
    print(shlex.join(command(root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
