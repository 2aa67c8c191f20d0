"""Peak memory of a process tree, sampled: the driver, its Ray processes, actors, workers.

A background thread walks the tree under one root process every ``interval_s`` and sums
each process's proportional set size (PSS: shared pages split among the processes that map
them, so the sum is what the tree really occupies; Ray's object store, a shared mapping,
counts once) and resident set size (RSS, which counts shared pages in every process). The
peaks of both sums are kept. Where PSS cannot be read, RSS stands in for it.

Reading PSS makes the kernel walk each process's page tables: about 4 ms per process here,
50 ms for a Ray run's 12 processes. Sampled every 0.1 s that would take half a core from
the system it measures (and far more from a 12-process tree than from a single process),
so the wait between samples stretches to keep the sampler at :data:`MAX_SHARE` of a core.

Example:
    >>> import os
    >>> with TreeMemory(os.getpid(), interval_s=0.01) as memory:
    ...     _ = bytearray(10 << 20)
    >>> memory.peak_rss_mb > 10
    True
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

import psutil

MB = 1 << 20
#: The share of one core the sampler may use (its time per sample / the wait after it).
MAX_SHARE = 0.05


class TreeMemory:
    """Samples the summed memory of ``pid`` and all its descendants while in a ``with`` block.

    Attributes:
        peak_pss_mb: The highest summed PSS seen, in MiB.
        peak_rss_mb: The highest summed RSS seen, in MiB.
        peak_processes: The most processes seen in the tree at once.
    """

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_pss_mb = self.peak_rss_mb = 0.0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-memory", daemon=True)
        self._cache: dict[int, psutil.Process] = {}

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        wait = self.interval_s
        while not self._stop.wait(wait):
            started = time.perf_counter()
            self.sample()
            wait = max(self.interval_s, (time.perf_counter() - started) / MAX_SHARE)

    def _tree(self) -> list[psutil.Process]:
        try:
            root = self._cache.get(self.pid) or psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        # Reuse Process objects: psutil then keeps each one's identity (pid reuse safe).
        self._cache = {p.pid: self._cache.get(p.pid, p) for p in procs}
        return list(self._cache.values())

    def sample(self) -> None:
        """Take one sample now."""
        pss = rss = 0
        procs = self._tree()
        for proc in procs:
            try:
                info = proc.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            except psutil.AccessDenied:
                try:
                    rss += proc.memory_info().rss
                    pss += proc.memory_info().rss
                except psutil.Error:
                    pass
            except psutil.Error:
                pass
        self.peak_pss_mb = max(self.peak_pss_mb, pss / MB)
        self.peak_rss_mb = max(self.peak_rss_mb, rss / MB)
        self.peak_processes = max(self.peak_processes, len(procs))
