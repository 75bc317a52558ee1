"""`ray job submit -- python -m scalelm.launch.ray` on a real local Ray head started by the test: two CPU
workers train the tiny config; one is killed mid-run, Ray restarts the workers and they resume from
the newest checkpoint to finish the run."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from scalelm.parallel.topology import free_port
from tests.launched import SFT_RUN, TINY, steps_logged

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

REPO = Path(__file__).resolve().parents[2]
RAY = shutil.which("ray", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster (2 CPUs) with its job server on loopback; `ray stop` at the end."""
    if RAY is None:
        pytest.fail("no `ray` command: install the ray extra (pip install -e '.[ray]', part of '.[dev]')", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths under it must fit in 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # NOTE: a port is free when chosen but not reserved: a rank of a test running beside this one may take it
    # before Ray binds it, and Ray then fails to start, or starts without a job server. Either way the head is
    # stopped and started again on other ports.
    problem = "not started"
    for _ in range(3):
        dashboard = free_port()
        # the agent's own ports too: its HTTP default (52365) is fixed, and was found taken
        started = subprocess.run([RAY, "start", "--head", "--num-cpus=2", f"--port={free_port()}",
                                  "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                                  f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={root}"],
                                 env=env, capture_output=True, text=True, timeout=300)
        env["RAY_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
        # the job server and its agent come up after `ray start` returns
        problem = f"ray start failed: {started.stderr[-2000:]}" if started.returncode else accepts_jobs(env, timeout_s=150)
        if problem is None:
            break
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
    if problem:
        logs = sorted(root.glob("session_*/logs/dashboard*.log"))
        pytest.fail(f"no Ray head took a job in three tries: {problem[-1000:]} {logs[-1].read_text()[-1000:] if logs else ''}",
                    pytrace=False)
    yield env
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(root, ignore_errors=True)


def accepts_jobs(env: dict, timeout_s: float) -> str | None:
    """None once a trivial job submitted with `ray job submit` succeeds; else the last answer."""
    deadline, answer = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        done = subprocess.run([RAY, "job", "submit", "--", "true"], env=env, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            return None
        answer = done.stderr or done.stdout
        time.sleep(2)
    return answer


def submit(env: dict, *command: str, **popen) -> tuple[str, subprocess.Popen]:
    """`ray job submit -- COMMAND` started: (its submission id, the process that follows it)."""
    submission = f"scalelm-test-{uuid.uuid4().hex[:12]}"
    return submission, subprocess.Popen([RAY, "job", "submit", f"--submission-id={submission}", "--", *command], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def job_log(env: dict, submission: str) -> str:
    """The job's whole output: `ray job submit` can stop following it before its last lines (ray-project/ray#48701),
    `ray job logs` reads the file."""
    return subprocess.run([RAY, "job", "logs", submission], env=env, capture_output=True, text=True, timeout=120).stdout


def train_workers() -> list[int]:
    """Pids of the live Ray Train workers (Ray titles its actor processes ray::CLASS)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_ray_job_trains_and_resumes_after_a_worker_is_killed(ray_head, pipeline, tmp_path):
    steps, run = 60, tmp_path / "run"
    submission, job = submit(
        ray_head, sys.executable, "-m", "scalelm.launch.ray", "--config", str(REPO / "configs/tiny.yaml"), "--workers", "2",
        "--max-failures", "2", f"data.train={pipeline['shards']}", f"data.tokenizer={pipeline['tokenizer']}",
        f"log.dir={run}", f"train.steps={steps}", "checkpoint.every=10", *TINY)
    try:
        deadline = time.monotonic() + 600
        while not (run / "checkpoints" / "step-00000010").is_dir():  # mid-run, with a checkpoint to resume from
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-3000:]
            time.sleep(0.2)
        victim = train_workers()
        assert len(victim) == 2
        os.kill(victim[1], signal.SIGKILL)
        log, _ = job.communicate(timeout=600)
    finally:
        job.kill()
    assert job.returncode == 0, log[-3000:]
    assert f"done: step {steps}" in job_log(ray_head, submission)
    assert steps_logged(run) == list(range(1, steps + 1))  # each step once, none lost
    events = (run / "events.log").read_text()
    resumed_at = int(events.split("resuming from ")[1].split("(step ")[1].split(")")[0])
    assert 10 <= resumed_at < steps  # the new workers went on from the checkpoint, not from scratch
    assert f"saved {run / 'checkpoints' / f'step-{steps:08d}'} (end of run" in events



def test_ray_job_finetunes_when_asked(ray_head, chat, sft_start, tmp_path):
    run = tmp_path / "run"
    submission, job = submit(
        ray_head, sys.executable, "-m", "scalelm.launch.ray", "finetune", "--config", str(REPO / "configs/sft-tiny.yaml"),
        "--workers", "2", f"data.train={chat['shards']}", f"train.init_from={sft_start}", f"log.dir={run}", *SFT_RUN,
        "train.steps=3", "train.eval_every=0")
    log, _ = job.communicate(timeout=600)
    assert job.returncode == 0, log[-3000:]
    assert "done: step 3" in job_log(ray_head, submission) and steps_logged(run) == [1, 2, 3]
    assert "started from the weights of" in (run / "events.log").read_text()
