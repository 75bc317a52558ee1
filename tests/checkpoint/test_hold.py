"""The hold on a checkpoint.dir: a live run's refuses a second one, naming it; a stale one is taken over."""

import json
import os
import socket
import subprocess
import time

import pytest
import torch

from scalelm.checkpoint.hold import HOLD, Hold
from scalelm.errors import CheckpointError
from scalelm.parallel.topology import Layout

ONE = Layout(rank=0, world=1, tensor=1, pipeline=1, data=1, tp_rank=0, dp_rank=0, pp_rank=0, device=torch.device("cpu"))


def hold_of(root, host, pid, job=None, age=0.0):
    root.mkdir(parents=True, exist_ok=True)
    (root / HOLD).write_text(json.dumps({"host": host, "pid": pid, "job": job, "since": time.time() - age}))
    os.utime(root / HOLD, (time.time() - age, time.time() - age))


@pytest.fixture
def live_process():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_run_holds_the_directory_renews_the_hold_and_gives_it_back(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with Hold(tmp_path, timeout=0.5, layout=ONE) as hold:
        held = json.loads((tmp_path / HOLD).read_text())
        assert held["host"] == socket.gethostname() and held["pid"] == os.getpid() and hold.note is None
        first, deadline = (tmp_path / HOLD).stat().st_mtime, time.monotonic() + 10
        while (tmp_path / HOLD).stat().st_mtime == first:  # renewed every timeout / 10
            assert time.monotonic() < deadline, "the hold was not renewed"
            time.sleep(0.02)
    assert not (tmp_path / HOLD).exists()


def test_a_live_run_on_this_host_refuses_a_second_one_naming_it(tmp_path, live_process, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "8")
    hold_of(tmp_path, socket.gethostname(), live_process, job="SLURM job 7", age=30)  # alive: its age does not matter
    with pytest.raises(CheckpointError, match=f"in use by another run: host {socket.gethostname()}, pid {live_process}, "
                                              "SLURM job 7") as e:
        Hold(tmp_path, timeout=600, layout=ONE).__enter__()
    assert "\n" not in str(e.value) and "set checkpoint.dir elsewhere" in str(e.value)
    assert json.loads((tmp_path / HOLD).read_text())["pid"] == live_process  # left as it was


def test_a_live_run_on_another_host_refuses_a_second_one_until_it_stops_renewing(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    hold_of(tmp_path, "elsewhere", 1, age=2)
    with pytest.raises(CheckpointError, match="host elsewhere, pid 1, holding it since .* renewed 2 s ago"):
        Hold(tmp_path, timeout=10, layout=ONE).__enter__()
    hold_of(tmp_path, "elsewhere", 1, age=12)
    with Hold(tmp_path, timeout=10, layout=ONE) as hold:
        assert hold.note.startswith("took over checkpoint.dir's hold from host elsewhere, pid 1: not renewed for 12 s")
        assert json.loads((tmp_path / HOLD).read_text())["pid"] == os.getpid()


def test_a_hold_whose_process_is_gone_or_of_this_same_job_is_taken_over_at_once(tmp_path, monkeypatch):
    gone = subprocess.Popen(["true"])
    gone.wait()
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    hold_of(tmp_path, socket.gethostname(), gone.pid)
    with Hold(tmp_path, timeout=600, layout=ONE) as hold:
        assert hold.note.endswith("that process is gone")
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # a requeued job: its earlier run was on another node
    hold_of(tmp_path, "elsewhere", 1, job="SLURM job 7")
    with Hold(tmp_path, timeout=600, layout=ONE) as hold:
        assert hold.note == "took over checkpoint.dir's hold from host elsewhere, pid 1, SLURM job 7: an earlier run of this job"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left beside the checkpoints
