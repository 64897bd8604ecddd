"""Tests for repic_ray/reaper.py: a process's children end when it is killed outright."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

# A parent that starts the watcher, then two children: one in its process group, one in a
# session of its own (found only by the watcher's look at the descendants).
PARENT = textwrap.dedent("""
    import json, subprocess, sys, time
    from repic_ray.reaper import watch_children
    watch_children(0.1)
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    a = subprocess.Popen(sleep)
    b = subprocess.Popen(sleep, start_new_session=True)
    time.sleep(1.0)  # ten looks of the watcher
    print(json.dumps([a.pid, b.pid]), flush=True)
    time.sleep(600)
""")

# Starts PARENT inside its own group without making it the group's leader.
LEADER = textwrap.dedent("""
    import subprocess, sys, time
    p = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=sys.stdout)
    print(p.pid, flush=True)
    time.sleep(600)
""")


def _gone(pids: list[int], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _kill_all(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def test_children_end_when_a_group_leading_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    kids = json.loads(parent.stdout.readline())
    try:
        assert all(psutil.pid_exists(p) for p in kids)
        parent.kill()
        parent.wait(timeout=10)
        assert _gone(kids), "a child outlived its killed parent"
    finally:
        _kill_all(kids)


def test_watch_children_returns_once_the_watcher_is_watching():
    code = textwrap.dedent("""
        import psutil
        from repic_ray.reaper import watch_children
        w = watch_children(0.1)
        print(w.poll() is None and psutil.Process(w.pid).status() != psutil.STATUS_ZOMBIE, flush=True)
        print(watch_children(0.1) is w, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.split() == ["True", "True"], out.stderr


def test_a_parent_that_does_not_lead_its_group_leaves_the_group_alone():
    leader = subprocess.Popen([sys.executable, "-c", LEADER, PARENT], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        parent_pid = int(leader.stdout.readline())
        kids = json.loads(leader.stdout.readline())
        os.kill(parent_pid, signal.SIGKILL)
        assert _gone(kids), "a child outlived its killed parent"
        # The group's leader (not a descendant of the killed parent) is untouched.
        time.sleep(0.5)
        assert leader.poll() is None
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait(timeout=10)
        _kill_all(kids)
