"""StepThreads: a loop's torch thread count chosen by timing its own steps (stages.core.parallel)."""

import time

import pytest
import torch

from stages.core.parallel import StepThreads


def run(threads: StepThreads, steps: int, seconds_at: dict[int, float]) -> list[int]:
    """A loop whose step takes seconds_at[current torch threads]; the counts it ran at."""
    used = []
    with threads:
        for _ in range(steps):
            threads.tick()
            n = torch.get_num_threads()
            used.append(n)
            time.sleep(seconds_at[n])
    return used


def test_auto_keeps_the_fastest_count_and_restores_the_previous_one():
    before = torch.get_num_threads()
    threads = StepThreads(0, probe_steps=2, hold_steps=50, cores=4)
    assert threads.candidates == [1, 2, 4]
    used = run(threads, 40, {1: 0.024, 2: 0.008, 4: 0.016})
    assert set(used[:9]) == {1, 2, 4}  # each candidate probed (the first step after a change is not counted)
    assert used[12:] == [2] * len(used[12:])
    assert torch.get_num_threads() == before
    assert threads.summary()["threads"] == "auto" and threads.probes == 1


def test_auto_probes_again_when_the_chosen_count_slows_down():
    """Another process takes a core: the chosen count becomes the slow one and the loop moves off it."""
    threads = StepThreads(0, probe_steps=2, hold_steps=1000, cores=2)
    costs = {1: 0.020, 2: 0.006}
    with threads:
        for step in range(80):
            threads.tick()
            if step == 20:
                costs.update({1: 0.020, 2: 0.080})  # two threads now spin against the other job
            time.sleep(costs[torch.get_num_threads()])
        assert threads.current == 1
    assert threads.probes == 2
    summary = threads.summary()["steps_at_threads"]
    assert summary["1"] > 35  # most of the last 60 steps


def test_fixed_count_never_changes():
    threads = StepThreads(3, cores=2)
    assert run(threads, 10, {3: 0.0}) == [3] * 10
    assert threads.probes == 0 and threads.summary() == {"threads": 3, "steps_at_threads": {"3": 10}, "probes": 0}


def test_one_core_auto_is_one_thread_and_negative_is_refused():
    assert run(StepThreads(0, cores=1), 5, {1: 0.0}) == [1] * 5
    with pytest.raises(ValueError, match="threads must be >= 0"):
        StepThreads(-1)
