"""Fresh locks in a forked child.

A lock that another thread holds when the process forks stays held for good in the
child, where that thread does not exist: the child's next LLM call would wait on it
forever. Servers that import the app and then fork workers (``gunicorn --preload``,
uWSGI, ``multiprocessing`` with fork) do exactly that, so every lock on a call's path
is renewed in the child.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

__all__ = ["renew_after_fork"]

_HOLDERS: weakref.WeakSet[Any] = weakref.WeakSet()


def renew_after_fork(holder: Any) -> None:
    """Give ``holder`` a new ``_lock`` in every child this process forks from now on,
    then call its ``_after_fork()`` if it has one (for more to renew)."""
    _HOLDERS.add(holder)


def _in_child() -> None:
    for holder in list(_HOLDERS):
        holder._lock = threading.Lock()
        after = getattr(holder, "_after_fork", None)
        if after is not None:
            after()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_in_child)
