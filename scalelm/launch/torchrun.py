"""`scalelm pretrain --nproc-per-node N` (and finetune, score, eval): N local ranks, started by torchrun's launcher
running in this process, each running the same command.

What a user reads of a run that fails is one line from its ranks, the error, printed once by the first rank to
report it (parallel/topology.py), and one line from here naming the rank that failed and how, in place of torchrun's
report (its traceback of ChildFailedError and its log lines); nothing from the launcher when all goes well.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

from scalelm.parallel.topology import free_port


def relaunch(nproc_per_node: int, argv: Sequence[str]) -> int:
    """Run `scalelm ARGV` as `nproc_per_node` ranks under torch.distributed's elastic launcher; the exit status of
    the rank that failed first (0 when every rank succeeded)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    # torchrun's own log lines (its OMP_NUM_THREADS notice, each rank's failure) and its report are its launcher's
    # business; this command says what happened in its own words
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets for its ranks, without its notice
    args = get_args_parser().parse_args([f"--nproc-per-node={nproc_per_node}", f"--master-port={free_port()}",
                                         "--master-addr=127.0.0.1", "-m", "scalelm", *argv])
    config, entrypoint, entry_args = config_from_args(args)
    try:
        elastic_launch(config, entrypoint)(*entry_args)
    except ChildFailedError as e:
        rank, failure = first_failure(e.failures)
        how = f"status {failure.exitcode}" if failure.exitcode > 0 else f"signal {failure.signal_name()}"
        print(f"scalelm: rank {rank} of {nproc_per_node} exited with {how}", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    return 0


def first_failure(failures: dict) -> tuple[int, object]:
    """(rank, torchelastic's ProcessFailure) of the failure to name: a rank that exited with an error before one that
    was stopped by a signal, the earliest, the lowest rank."""
    rank = min(failures, key=lambda r: (failures[r].exitcode <= 0, failures[r].timestamp, r))
    return rank, failures[rank]

