"""The C heap of a long-lived worker: few malloc arenas, freed memory given back to the system.

Public surface: ``HeapKeeper``.

A worker's Python and torch objects are bounded (README, "Bounded state"), yet its resident memory kept
creeping up under steady traffic (``loopline bench soak``). glibc's allocator is why: each thread that
allocates (the event loop, the training thread, the view threads, RocksDB's and torch's own) gets an
arena of its own, and memory freed inside an arena stays in the process until the arena's top is free.
Two remedies, both standard for long-lived glibc processes:

* at start, at most ``max_arenas`` arenas (``mallopt(M_ARENA_MAX)``; the default is 8 per core);
* every ``trim_s`` seconds, ``malloc_trim(0)`` returns the free pages of every arena to the system (in a
  thread: it walks the heap, and ctypes releases the GIL for it).

:meth:`HeapKeeper.usage` reads ``mallinfo2``: what the program holds (``in_use_mb``, mmapped blocks
included) and what the allocator keeps free inside its arenas (``free_mb``). Together they tell a growing
resident size apart: live allocations that grow (a structure filling, or a leak) or fragmentation.

On a C library without these calls (musl, macOS) both do nothing (``available`` False).

>>> keeper = HeapKeeper(max_arenas=2)
>>> keeper.trim() in (True, False), keeper.counts["trims"]
(True, 1)
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["HeapKeeper"]

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


class _Mallinfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h: ten size_t fields, summed over every arena
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


class HeapKeeper:
    """Caps the arenas once (at construction) and trims on :meth:`trim`; ``counts`` for ``/views``."""

    def __init__(self, max_arenas: int = 2):
        self._libc = _libc()
        self.available = self._libc is not None
        self.counts = {"trims": 0, "released": 0, "max_arenas": max_arenas if self.available else None}
        if self.available and max_arenas > 0:
            self._libc.mallopt(M_ARENA_MAX, int(max_arenas))

    def usage(self) -> dict | None:
        """The allocator's own figures (MiB): ``in_use_mb`` (allocated, mmapped blocks included),
        ``free_mb`` (free inside the arenas), ``mmapped_mb``; None without ``mallinfo2``."""
        fn = getattr(self._libc, "mallinfo2", None) if self.available else None
        if fn is None:
            return None
        fn.restype = _Mallinfo2
        m = fn()
        mb = 1 << 20
        return {"in_use_mb": round((m.uordblks + m.hblkhd) / mb, 1), "free_mb": round(m.fordblks / mb, 1),
                "mmapped_mb": round(m.hblkhd / mb, 1)}

    def trim(self) -> bool:
        """Give free heap pages back to the system; True when some were released."""
        self.counts["trims"] += 1
        if not self.available:
            return False
        released = bool(self._libc.malloc_trim(0))
        self.counts["released"] += released
        return released
