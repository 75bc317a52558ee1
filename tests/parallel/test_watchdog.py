"""The heartbeat's verdicts, over a store of this process: which ranks are silent, failed, or stuck."""

import threading
import time

import torch
import torch.distributed as dist

from scalelm.parallel.topology import Layout, process_group_timeout
from scalelm.parallel.watchdog import VERDICT, Watchdog


def watchdog(rank: int, world: int, timeout: float) -> tuple[Watchdog, dist.Store]:
    layout = Layout(rank=rank, world=world, tensor=1, pipeline=1, data=world, tp_rank=0, dp_rank=rank, pp_rank=0,
                    device=torch.device("cpu"))
    dog, store = Watchdog(timeout, layout), dist.HashStore()
    dog._store = store
    return dog, store


def beat(store, rank: int, count: int, step: int, state: str = "ok") -> None:
    store.set(f"scalelm/beat/{rank}", f"{count} {step} {state} node{rank % 2 + 1} {1000 + rank}")


def test_rank_0_names_the_rank_whose_beat_stopped_and_posts_it_for_the_others():
    dog, store = watchdog(0, world=3, timeout=0.3)
    count, deadline = 0, time.monotonic() + 10
    for rank in range(3):
        beat(store, rank, 0, step=5)
    while (verdict := dog._watch()) is None:  # ranks 0 and 1 go on beating, rank 2 has stopped
        assert time.monotonic() < deadline, "no verdict"
        count += 1
        beat(store, 0, count, step=5)
        beat(store, 1, count, step=5)
        time.sleep(0.01)
    assert verdict.startswith("rank 2 (node1, pid 1002) sent no heartbeat for 0.3 s (parallel.timeout) in step 5")
    assert "\n" not in verdict and store.get(VERDICT).decode() == verdict
    other, _ = watchdog(1, world=3, timeout=0.3)
    other._store = store
    assert other._watch() == verdict  # the others take rank 0's word


def test_after_a_failed_collective_the_ranks_that_stopped_without_failing_are_named():
    dog, store = watchdog(1, world=4, timeout=0.3)
    beat(store, 0, 1, step=7)  # stopped beating, never failed: lost
    beat(store, 2, 1, step=7, state="failed")  # saw the failure too and is ending
    beat(store, 3, 1, step=7)  # lost as well
    line = dog.explain()
    assert line.startswith("rank 0 (node1, pid 1000), rank 3 (node2, pid 1003) stopped answering in step 7: its host "
                           "is lost, or the process was killed; stopping.")
    assert store.get("scalelm/beat/1").decode().split()[2] == "failed"


def test_when_every_rank_still_beats_the_one_in_an_earlier_step_is_stuck():
    dog, store = watchdog(0, world=3, timeout=0.3)
    dog.step = 8
    done = threading.Event()

    def alive():
        count = 0
        while not done.wait(0.01):
            count += 1
            beat(store, 1, count, step=8)
            beat(store, 2, count, step=7)

    thread = threading.Thread(target=alive)
    thread.start()
    try:
        line = dog.explain()
    finally:
        done.set()
        thread.join()
    assert line.startswith("rank 2 (node1, pid 1002) is still in step 7 while others are in step 8: alive but stuck")


def test_the_process_group_waits_longer_than_the_watchdog():
    assert process_group_timeout(600).total_seconds() == 900 and process_group_timeout(5).total_seconds() == 60
