"""What the launcher tests (SLURM, Ray, torchrun) hand a run and read back from it."""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from scalelm.train.log import read_records

# overrides of configs/tiny.yaml: a model that starts and steps fast, a record for every step
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "train.seq_len=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_every=0", "data.num_workers=0", "optim.warmup_steps=2",
        "log.every=1", "log.tensorboard=false"]

# a finetuning run's model (as pretrained by the sft_start fixture) and run settings, chat shards of 128 tokens
SFT_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4"]
SFT_RUN = ["train.seq_len=128", "train.micro_batch_size=2", "train.global_batch_size=4", "train.precision=fp32",
           "data.num_workers=0", "optim.warmup_steps=1", "optim.lr=3e-3", "log.every=1", "log.tensorboard=false"]


REPO = Path(__file__).resolve().parents[2]
# a launcher's own variables are not passed on: each launcher sets them for its ranks
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} \
    | {"OMP_NUM_THREADS": "1"}
# what the runs across two hosts train, and the same run on one host trains to the same losses
ACROSS = ["parallel.tensor=2", "train.steps=4", "checkpoint.every=4"]


def pretrain_args(pipeline: dict[str, Path], run: Path, *extra: str) -> list[str]:
    """`scalelm` arguments of a tiny pretraining run on the test pipeline's shards, into RUN."""
    return ["pretrain", "--config", str(REPO / "configs/tiny.yaml"), f"data.train={pipeline['shards']}",
            f"data.tokenizer={pipeline['tokenizer']}", f"log.dir={run}", *TINY, *extra]


def on_one_host(pipeline: dict[str, Path], run: Path, *extra: str, ranks: int = 2) -> Path:
    """RUN, trained by `scalelm pretrain --nproc-per-node RANKS` on this host."""
    done = subprocess.run([sys.executable, "-m", "scalelm", *pretrain_args(pipeline, run, *extra), "--nproc-per-node",
                           str(ranks)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_records(run) if "loss" in r]


def steps_logged(run: Path) -> list[int]:
    """The training steps in RUN/metrics.jsonl, in file order (a resumed run keeps those up to its checkpoint)."""
    return [r["step"] for r in read_records(run) if "loss" in r]


@contextmanager
def running(service, error: type[Exception], start=None):
    """`service` (hosts, a cluster) started by `start` (default: its own start()) for a fixture's tests and stopped
    after them. One that cannot start fails them with its one-line `error`, after what did start is stopped."""
    try:
        (start or service.start)()
    except error as e:
        service.stop()
        pytest.fail(str(e), pytrace=False)
    try:
        yield service
    finally:
        service.stop()
