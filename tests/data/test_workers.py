import os

from scalelm.data.workers import default_workers, imap_ordered


def square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def test_results_keep_input_order_on_many_processes():
    results = list(imap_ordered(square_and_pid, range(40), workers=2))
    assert [r for r, _ in results] == [x * x for x in range(40)]
    assert os.getpid() not in {pid for _, pid in results}


def test_one_worker_runs_inline():
    assert {pid for _, pid in imap_ordered(square_and_pid, range(3), workers=1)} == {os.getpid()}


def test_default_is_the_usable_cores():
    assert 1 <= default_workers() <= (os.cpu_count() or 1)
