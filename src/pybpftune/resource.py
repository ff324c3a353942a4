"""The one shape of everything that holds a kernel resource (an fd, a BPF
object, a link, a socket, a child process)."""

from __future__ import annotations

from typing import Self


class Resource:
    """A context manager whose ``close()`` is idempotent: ``with`` closes it,
    and closing twice (a failed start, then the daemon's teardown) is safe.
    Owners close what they hold in reverse order of acquiring it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
