"""Processes that die with the process that started them.

vLLM runs its engine core (and, with it, its workers) in child processes. When the
process that built the engine is killed outright — a Ray actor whose raylet died with
the job, `kill -9`, the out-of-memory killer — nothing runs its clean-up, and the engine
keeps its memory and threads as an orphan. `watch_children()` starts a small watcher
process that notices the death of its parent and then ends the parent's descendants:
those it saw in its last look (every `interval` seconds), and the whole process group
when the dead process led its own group (as every Ray worker does), so a child started
between two looks goes too.

    python -m repic_ray.reaper PID [INTERVAL]   # what `watch_children` runs
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

_started: dict[int, subprocess.Popen] = {}


def watch_children(interval: float = 0.5) -> subprocess.Popen:
    """Start (once per process) a watcher that ends this process's children when it dies."""
    pid = os.getpid()
    proc = _started.get(pid)
    if proc is None or proc.poll() is not None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "repic_ray.reaper", str(pid), str(interval)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        # Return once the watcher holds this process and its first look at the children: a
        # child started after this call is seen, even when the machine is slow to start Python.
        ready = proc.stdout.readline()
        proc.stdout.close()
        if ready.strip() != b"watching":
            raise RuntimeError(f"the child watcher of process {pid} did not start (exit {proc.poll()})")
        _started[pid] = proc
    return proc


def _end(procs: list[psutil.Process], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` s, skipping reused PIDs (psutil checks)."""
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _announce() -> None:
    """Tell `watch_children` (on stdout, then closed) that the watch has begun."""
    try:
        sys.stdout.write("watching\n")
        sys.stdout.flush()
        sys.stdout.close()
    except (OSError, ValueError):
        pass


def watch(parent_pid: int, interval: float = 0.5) -> None:
    """Wait for `parent_pid` to end, then end its last-seen descendants (not this one)."""
    me = os.getpid()
    try:
        parent = psutil.Process(parent_pid)
        group = os.getpgid(parent_pid)
    except (psutil.Error, OSError):
        return
    leads_group = group == parent_pid
    seen: list[psutil.Process] = []
    announced = False
    while True:
        try:
            if not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE:
                break
            seen = [p for p in parent.children(recursive=True) if p.pid != me]
        except psutil.Error:
            break
        if not announced:
            _announce()
            announced = True
        time.sleep(interval)
    # The parent is gone: its children now belong to init (or a subreaper).
    _end(seen)
    if leads_group and os.getpgid(0) == group:
        # Whatever else is left of the dead process's group, this watcher included.
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    # Ignore the terminal's and the group's interrupts: this process must outlive its parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(args[0]), float(args[1]) if len(args) > 1 else 0.5)


if __name__ == "__main__":
    main()
