"""pybpftune: BPF-driven auto-tuning of Linux networking, in Python.

A daemon watches the kernel with BPF programs and tunes sysctls in response,
explaining each change.  Import the pieces you need::

    from pybpftune.objects import LoadedObject, OpenObject
    from pybpftune.ringbuf import SharedMaps
    from pybpftune.support import probe_support
"""

__version__ = "0.1.0"
