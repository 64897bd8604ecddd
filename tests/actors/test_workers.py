"""actors/workers.py: the CPU cores each rollout worker's vLLM engine binds its threads to."""

from __future__ import annotations

from actors.workers import cpu_binding


def test_cpu_binding_spreads_workers_over_the_cores():
    # one thread each (the default): worker i on core i, wrapping
    assert [cpu_binding(i, 0, 2) for i in range(3)] == ["0", "1", "0"]
    # two threads each on 4 cores: workers 0 and 1 get disjoint pairs
    assert [cpu_binding(i, 2, 4) for i in range(2)] == ["0,1", "2,3"]
    # a sync run on 2 cores: the one worker may use both while the learner waits
    assert cpu_binding(0, 2, 2) == "0,1"
    # more threads than cores: capped at the node's cores
    assert cpu_binding(0, 8, 2) == "0,1"
