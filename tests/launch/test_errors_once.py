"""An error on many ranks is one line, once: checks that need no model run in the launching process before any rank
starts, an error raised on ranks is printed by the first rank that reports it, and `--nproc-per-node`'s launcher
says in one line which rank failed and how, in place of torchrun's report. (The same under SLURM: test_slurm.py.)"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.launched import ENV, REPO, SFT_RUN, pretrain_args

pytestmark = pytest.mark.slow


def scalelm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalelm", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_shards_that_do_not_fit_the_config_end_in_one_line_before_any_rank_starts(chat, sft_start, tmp_path):
    done = scalelm("finetune", "--config", str(REPO / "configs/sft-tiny.yaml"), f"data.train={chat['shards']}",
                   f"train.init_from={sft_start}", f"log.dir={tmp_path / 'run'}", *SFT_RUN, "train.seq_len=64",
                   "--nproc-per-node", "2", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"scalelm: error: {chat['shards']} (train) holds conversations of up to "
                                        f"{done.stderr.split('up to ')[1].split()[0]} tokens, longer than "
                                        f"train.seq_len=64: re-shard with --seq-len 64 or raise train.seq_len"]
    assert done.stdout == "" and not (tmp_path / "run").exists()  # no rank started


def test_an_error_every_rank_raises_is_printed_once_with_the_failed_rank_named(pipeline, tmp_path):
    shards = shutil.copytree(pipeline["shards"], tmp_path / "shards")
    for shard in shards.glob("train-*.tar"):  # damaged where no check before training looks: the loader finds it
        shard.write_bytes(shard.read_bytes()[:1000])
    args = pretrain_args({**pipeline, "shards": shards}, tmp_path / "run", "train.steps=2")
    done = scalelm(*args, "--nproc-per-node", "2", cwd=REPO)
    assert done.returncode == 2
    error, launcher = done.stderr.splitlines()
    assert error.startswith(f"scalelm: error: {shards}/train-") and "corrupt or unreadable shard" in error
    assert launcher in ("scalelm: rank 0 of 2 exited with status 2", "scalelm: rank 1 of 2 exited with status 2")
    assert "Traceback" not in done.stdout + done.stderr and "built successfully" not in done.stdout
