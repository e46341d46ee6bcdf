"""Peak memory of a process tree, sampled from /proc: what the screening benchmarks measure."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

SAMPLE_SECONDS = 0.2


class TreeSampler:
    """Peak summed RSS (and PSS) of a process and all its descendants, and of the process alone, from /proc.

    Descendants rather than every Ray process on the machine: another Ray instance (a test
    suite, the other engineer's job) must not count towards this run's memory.
    """

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[int, str] = {}  # pid -> start time: every process of the tree, for the cleanup
        self.peak_tree_rss = self.peak_tree_pss = self.peak_driver_rss = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _stat(pid: int | str) -> list[str] | None:
        """/proc/PID/stat's fields after the command name (which may hold spaces): [state, ppid, ...]."""
        try:
            with open(f"/proc/{pid}/stat") as handle:
                return handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None

    @classmethod
    def _rss(cls, pid: int) -> int:
        try:
            with open(f"/proc/{pid}/statm") as handle:
                return int(handle.read().split()[1]) * cls.PAGE
        except (OSError, ValueError, IndexError):
            return 0

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return 0

    def tree(self) -> dict[int, str]:
        """pid -> start time of the process and its descendants now."""
        parents: dict[int, int] = {}
        started: dict[int, str] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            fields = self._stat(entry)
            if fields is None or len(fields) < 20:
                continue
            parents[int(entry)], started[int(entry)] = int(fields[1]), fields[19]
        if self.pid not in started:
            return {}
        ours = {self.pid}
        grew = True
        while grew:
            children = {pid for pid, parent in parents.items() if parent in ours} - ours
            ours |= children
            grew = bool(children)
        return {pid: started[pid] for pid in ours}

    def sample(self) -> None:
        processes = self.tree()
        if not processes:
            return
        rss = pss = 0
        for pid, started in processes.items():
            self.seen.setdefault(pid, started)
            memory = self._rss(pid)
            rss += memory
            pss += self._pss(pid)
            if pid == self.pid:
                self.peak_driver_rss = max(self.peak_driver_rss, memory)
        if rss > self.peak_tree_rss:
            self.peak_tree_rss, self.peak_processes = rss, len(processes)
        self.peak_tree_pss = max(self.peak_tree_pss, pss)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_SECONDS)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def survivors(self) -> dict[int, str]:
        """pid -> command of each process of this tree still alive (the same process: same start time)."""
        alive = {}
        for pid, started in self.seen.items():
            fields = self._stat(pid)
            if fields is None or len(fields) < 20 or fields[19] != started or fields[0] == "Z":
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    argv = handle.read().decode(errors="replace").split("\0")
                # `python .../ray/_private/log_monitor.py ...` -> `_private/log_monitor.py`
                program = argv[1] if len(argv) > 1 and "python" in os.path.basename(argv[0]) else argv[0]
                alive[pid] = "/".join(program.split("/")[-2:])
            except OSError:
                continue
        return alive

    def kill_survivors(self, grace_s: float = 0.0) -> list[str]:
        """SIGKILL each process of this tree that outlived it by `grace_s`; returns their commands."""
        deadline = time.time() + grace_s
        while self.survivors() and time.time() < deadline:
            time.sleep(0.5)
        alive = self.survivors()
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
        return sorted(alive.values())

    def figures(self) -> dict[str, Any]:
        mb = 2**20
        return {
            "peak_tree_rss_mb": round(self.peak_tree_rss / mb, 1),
            "peak_tree_pss_mb": round(self.peak_tree_pss / mb, 1),
            "peak_driver_rss_mb": round(self.peak_driver_rss / mb, 1),
            "processes_at_peak": self.peak_processes,
            "samples": self.samples,
        }
