"""The one-line account of which host runs which ranks."""

import socket

from scalelm.parallel.topology import _spans, rank_hosts


def test_ranks_are_written_as_spans():
    assert _spans([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert _spans([5]) == "5"


def test_a_lone_process_names_its_host():
    assert rank_hosts() == f"{socket.gethostname()}: rank 0"
