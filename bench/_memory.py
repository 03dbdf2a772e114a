"""Anonymous memory of the running process (RssAnon: what cannot be dropped and read again from a file), which
the benchmarks report beside peak RSS: the pages of memory-mapped vector files count in RSS, and the kernel drops
those before anything else."""

from __future__ import annotations

import threading
from pathlib import Path


def rss_anon_gib() -> float | None:
    """This process's RssAnon now; Linux only (None elsewhere)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")), None)
    return kib / 2**20 if kib is not None else None


class AnonymousPeak:
    """Peak RssAnon of this process, sampled every 0.2 s from its creation to ``gib``; Linux only (None elsewhere)."""

    def __init__(self) -> None:
        self._peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while (now := rss_anon_gib()) is not None:
            self._peak = max(self._peak, now)
            if self._stop.wait(0.2):
                return

    def gib(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self._peak or None
