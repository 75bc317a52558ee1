"""Checkpoints against what kills real runs: SIGTERM and SIGUSR1, SIGKILL in the middle of a save, a
damaged newest checkpoint, non-finite losses; and `scalelm checkpoint consolidate`, including files
that are not what they claim to be."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from scalelm.checkpoint import store
from scalelm.config import load_config
from scalelm.errors import CheckpointError, TrainingError
from scalelm.parallel.plan import plan
from scalelm.train.loop import pretrain

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "train.seq_len=32",
        "train.micro_batch_size=4", "train.global_batch_size=8", "data.num_workers=0", "train.eval_every=0",
        "train.precision=fp32", "optim.warmup_steps=2", "log.every=1", "log.tensorboard=false", "checkpoint.keep=3"]


def overrides(pipeline, run: Path, *extra: str) -> list[str]:
    return [f"data.train={pipeline['shards']}", f"data.tokenizer={pipeline['tokenizer']}", f"log.dir={run}", *TINY, *extra]


def steps_logged(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return [r for r in out if "loss" in r]


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll `condition` until it holds (the training process goes at its own pace)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited with status {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "scalelm", *args]


def pretrain_cli(args: list[str]) -> list[str]:
    return ["pretrain", "--config", "configs/tiny.yaml", *args]


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}


def train_here(monkeypatch, args: list[str]):
    """pretrain in this process, as a lone rank."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    return pretrain(load_config(None, args))


def test_sigusr1_saves_and_sigterm_saves_and_stops_then_the_run_resumes(pipeline, tmp_path):
    run = tmp_path / "run"
    args = overrides(pipeline, run, "train.steps=100000", "checkpoint.every=100000")
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(cli(*pretrain_cli(args)), stdout=subprocess.DEVNULL, stderr=stderr, env=clean_env())
        try:
            wait_for(lambda: len(steps_logged(run)) >= 3, "three steps", proc)
            proc.send_signal(signal.SIGUSR1)
            wait_for(lambda: store.committed(run / "checkpoints"), "the SIGUSR1 checkpoint", proc)
            usr1_step = int(store.committed(run / "checkpoints")[0].name.removeprefix("step-"))
            wait_for(lambda: len(steps_logged(run)) >= usr1_step + 2, "training to go on after SIGUSR1", proc)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=300) == 143
        finally:
            proc.kill()
    message = (tmp_path / "stderr").read_text().strip().splitlines()[-1]
    assert message.startswith("scalelm: stopped by SIGTERM after step ")
    stopped_at = int(message.removeprefix("scalelm: stopped by SIGTERM after step ").split(";")[0])
    assert stopped_at > usr1_step
    saved = store.committed(run / "checkpoints")
    assert [p.name for p in saved] == [f"step-{stopped_at:08d}", f"step-{usr1_step:08d}"]
    assert store.resolve(run / "checkpoints") == saved[0]  # `latest`

    result = subprocess.run(cli(*pretrain_cli([*args[:-2], f"train.steps={stopped_at + 2}"])), capture_output=True,
                            text=True, env=clean_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from {saved[0]} (step {stopped_at})" in (run / "events.log").read_text()
    assert [r["step"] for r in steps_logged(run)] == list(range(1, stopped_at + 3))  # no step twice


SLOW_SAVE = """
import sys, time
import scalelm.checkpoint.store as store
write = store.write_tensors
def slow(path, *args, **kwargs):
    record = write(path, *args, **kwargs)
    if "step-00000004.tmp" in str(path):
        time.sleep(600)  # the test kills this process here, half-way through the save
    return record
store.write_tensors = slow
from scalelm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("background", [True, False], ids=["background", "blocking"])
def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint(pipeline, tmp_path, background):
    run = tmp_path / "run"
    args = overrides(pipeline, run, "train.steps=6", "checkpoint.every=2", f"checkpoint.background={background}")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *pretrain_cli(args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=clean_env())
    try:
        wait_for(lambda: any((run / "checkpoints" / "step-00000004.tmp").glob("*.safetensors")), "the second save", proc)
        if background:  # killed while training goes on beside the write
            wait_for(lambda: len(steps_logged(run)) >= 5, "a step during the save", proc)
    finally:
        proc.kill()
        proc.wait()
    if not background:
        assert len(steps_logged(run)) == 4  # training waited for the save
    ckpts = run / "checkpoints"
    assert [p.name for p in store.committed(ckpts)] == ["step-00000002"]
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    assert (ckpts / "step-00000004.tmp").is_dir()

    result = subprocess.run(cli(*pretrain_cli(args)), capture_output=True, text=True, env=clean_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from {ckpts / 'step-00000002'} (step 2)" in (run / "events.log").read_text()
    assert [p.name for p in store.committed(ckpts)] == ["step-00000006", "step-00000004", "step-00000002"]
    assert not list(ckpts.glob("*.tmp"))


def test_a_damaged_newest_checkpoint_is_reported_and_the_one_before_used(pipeline, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_here(monkeypatch, overrides(pipeline, run, "train.steps=4", "checkpoint.every=2"))
    newest = store.step_dir(run / "checkpoints", 4)
    damaged = next(newest.glob("model-*.safetensors"))
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    damaged.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        train_here(monkeypatch, overrides(pipeline, run, "train.steps=6", f"train.resume={newest}"))
    train_here(monkeypatch, overrides(pipeline, run, "train.steps=6", "checkpoint.every=2"))
    events = (run / "events.log").read_text()
    assert f"checkpoint {newest} failed verification ({damaged.name} does not match its SHA-256" in events
    assert f"resuming from {store.step_dir(run / 'checkpoints', 2)} (step 2)" in events
    assert [r["step"] for r in steps_logged(run)] == [1, 2, 3, 4, 5, 6]
    assert len(list((run / "checkpoints").glob("step-00000004.superseded-*"))) == 1  # kept aside, not deleted

    for ckpt in store.committed(run / "checkpoints"):  # everything damaged: no silent fresh start
        for file in ckpt.glob("model-*"):
            file.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies"):
        train_here(monkeypatch, overrides(pipeline, run, "train.steps=8"))


def test_a_checkpoint_of_another_model_is_refused_and_so_is_mixing_runs(pipeline, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_here(monkeypatch, overrides(pipeline, run, "train.steps=2"))
    with pytest.raises(CheckpointError, match="holds another model .*model.hidden_size=64 there, 128 here"):
        train_here(monkeypatch, overrides(pipeline, run, "train.steps=4", "model.hidden_size=128"))
    with pytest.raises(CheckpointError, match="holds checkpoints of an earlier run .*and train.resume=none"):
        train_here(monkeypatch, overrides(pipeline, run, "train.steps=4", "train.resume=none"))


@pytest.mark.parametrize("background", [True, False], ids=["background", "blocking"])
def test_a_save_that_cannot_write_is_one_clear_error_and_the_previous_checkpoint_stays(pipeline, tmp_path, monkeypatch,
                                                                                     background):
    run = tmp_path / "run"
    write = store.TensorWriter.write

    def disk_full(self, name, tensor):
        if "step-00000004" in str(self.path):
            raise OSError(28, "No space left on device", str(self.path))
        write(self, name, tensor)

    monkeypatch.setattr(store.TensorWriter, "write", disk_full)
    with pytest.raises(CheckpointError, match=r"could not save the checkpoint of step 4: rank 0: No space left on device "
                                              r"\(.*model-00000.safetensors\); the previous checkpoint is still the newest"):
        train_here(monkeypatch, overrides(pipeline, run, "train.steps=6", "checkpoint.every=2",
                                          f"checkpoint.background={background}"))
    assert [p.name for p in store.committed(run / "checkpoints")] == ["step-00000002"]
    assert store.resolve(run / "checkpoints").name == "step-00000002"
    trained = [r["step"] for r in steps_logged(run)]  # in the background, the error comes once the write has failed
    assert trained in ([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]] if background else [[1, 2, 3, 4]])


def test_steps_train_while_a_checkpoint_is_written_and_it_holds_the_state_of_its_step(pipeline, tmp_path, monkeypatch):
    from scalelm.parallel.engine import Engine

    steps_done, trained_on = [0], threading.Event()
    optimizer_step = Engine.optimizer_step

    def counted(self):
        optimizer_step(self)
        steps_done[0] += 1
        if steps_done[0] == 3:
            trained_on.set()

    write, waited = store.TensorWriter.write, []

    def held(self, name, tensor):  # step 2's files are written only once step 3 has trained (or 120 s have gone)
        if "step-00000002.tmp" in str(self.path) and not waited:
            waited.append(trained_on.wait(timeout=120))
        write(self, name, tensor)

    monkeypatch.setattr(Engine, "optimizer_step", counted)
    monkeypatch.setattr(store.TensorWriter, "write", held)
    args = overrides(pipeline, tmp_path / "background", "train.steps=4", "checkpoint.every=2")
    train_here(monkeypatch, args)
    assert waited == [True]  # the write of step 2 was under way while step 3 trained

    monkeypatch.setattr(store.TensorWriter, "write", write)
    train_here(monkeypatch, [a.replace("background", "blocking") for a in args] + ["checkpoint.background=false"])
    for step in (2, 4):  # the same bytes, so the snapshot is the state of its step, not of the steps trained after it
        files = [store.read_manifest(store.step_dir(tmp_path / mode / "checkpoints", step))["files"]
                 for mode in ("background", "blocking")]
        assert files[0] == files[1] and len(files[0]) == 3
    events = (tmp_path / "background" / "events.log").read_text()
    note = re.search(r"step 2: saved .*step-00000002 \(checkpoint.every; 1\.\d MB; training waited [\d.]+ s for the "
                     r"snapshot \((1\.\d) MB in host memory on rank 0\), written in the background in [\d.]+ s\)", events)
    planned = plan(load_config(str(tmp_path / "background" / "config.yaml")), 1).memory.snapshot
    assert note and float(note.group(1)) == pytest.approx(planned / 1e6, abs=0.05)  # what `scalelm plan` says


def poison(monkeypatch, bad_steps: set[int], micro_batches: int) -> None:
    """Make the loss NaN on the given steps (the step's first micro-batch)."""
    import scalelm.objectives.next_token as objectives

    loss_of, calls = objectives.token_losses, [0]

    def token_losses(logits, labels):
        calls[0] += 1
        loss = loss_of(logits, labels)
        step, first = divmod(calls[0] - 1, micro_batches)
        return loss * float("nan") if step + 1 in bad_steps and first == 0 else loss

    monkeypatch.setattr(objectives, "token_losses", token_losses)


def test_a_non_finite_loss_skips_the_step(pipeline, tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison(monkeypatch, {3}, micro_batches=2)
    train_here(monkeypatch, overrides(pipeline, run, "train.steps=6"))
    losses = [r["loss"] for r in steps_logged(run)]
    assert losses[2] != losses[2] and all(loss == loss for i, loss in enumerate(losses) if i != 2)  # NaN at step 3 only
    events = (run / "events.log").read_text()
    assert "step 3: loss is nan, step skipped (1 in a row" in events
    batch = events.split("its batch: ")[1].splitlines()[0].split(", ")  # where the step's 8 sequences came from
    assert len(batch) == 8 and all(".tar@" in origin for origin in batch)
    manifest = store.read_manifest(store.resolve(run / "checkpoints"))
    assert manifest["counters"]["skipped_steps"] == 1 and manifest["counters"]["adam_steps"] == 5
    weights = store.TensorReader(store.resolve(run / "checkpoints"), manifest)
    assert all(torch.isfinite(weights.get("param", name)).all() for name in weights.names())


def test_too_many_non_finite_losses_stop_with_the_last_good_checkpoint_intact(pipeline, tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison(monkeypatch, set(range(5, 100)), micro_batches=2)
    with pytest.raises(TrainingError, match=r"2 steps in a row \(up to step 6\) had a non-finite loss.*step-00000004"):
        train_here(monkeypatch, overrides(pipeline, run, "train.steps=10", "checkpoint.every=2", "train.max_bad_steps=2"))
    newest = store.resolve(run / "checkpoints")
    assert newest.name == "step-00000004"
    manifest = store.read_manifest(newest)
    assert store.verify(newest, manifest, sorted(manifest["files"])) == []


def test_consolidate_writes_every_weight_once_under_single_process_names(pipeline, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_here(monkeypatch, overrides(pipeline, run, "train.steps=2"))
    out = tmp_path / "model.safetensors"
    result = subprocess.run(cli("checkpoint", "consolidate", str(run / "checkpoints"), "--out", str(out)),
                            capture_output=True, text=True, env=clean_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    ckpt = store.resolve(run / "checkpoints")
    saved = store.TensorReader(ckpt, store.read_manifest(ckpt))
    with safe_open(out, framework="pt") as f:
        assert sorted(f.keys()) == sorted(saved.names())
        assert "embedding.word.weight" in f.keys() and "blocks.1.layer.mlp.linear_fc2.weight" in f.keys()
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), saved.get("param", name))
        meta = f.metadata()
    assert json.loads(meta["model"])["hidden_size"] == 64 and meta["vocab_size"] == "400" and meta["step"] == "2"


def test_loading_never_runs_code_from_a_checkpoint(pipeline, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_here(monkeypatch, overrides(pipeline, run, "train.steps=2"))
    ckpt = store.resolve(run / "checkpoints")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for file in ckpt.glob("model-*.safetensors"):
        file.write_bytes(pickle.dumps({"weights": Payload()}))  # a pickle posing as the weights
    for extra in ([], ["--no-verify"]):
        result = subprocess.run(cli("checkpoint", "consolidate", str(ckpt), "--out", str(tmp_path / "m.safetensors"),
                                    *extra), capture_output=True, text=True, env=clean_env(), timeout=300)
        assert result.returncode == 2 and result.stderr.startswith("scalelm: error: ")
        assert ("failed verification" if not extra else "cannot read") in result.stderr
    assert not marker.exists()

    (ckpt / "manifest.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="manifest.json is damaged"):
        store.read_manifest(ckpt)
