"""Fresh locks in a forked child.

A lock that another thread holds when the process forks stays held for good in the
child, where that thread does not exist: the child's next LLM call would wait on it
forever. Servers that import the app and then fork workers (``gunicorn --preload``,
uWSGI, ``multiprocessing`` with fork) do exactly that, so every lock on a call's path
is renewed in the child.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

__all__ = ["renew_after_fork"]


class _ForkAware(Protocol):
    def _after_fork(self) -> None: ...


_HOLDERS: weakref.WeakSet[_ForkAware] = weakref.WeakSet()


def renew_after_fork(holder: _ForkAware) -> None:
    """Call ``holder._after_fork()`` in every child this process forks from now on."""
    _HOLDERS.add(holder)


def _in_child() -> None:
    for holder in list(_HOLDERS):
        holder._after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_in_child)
