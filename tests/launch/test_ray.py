"""`ray job submit -- python -m scalelm.launch.ray` on a real two-node Ray cluster started by the test: a head on
node1 and a worker node on node2 (tests/hosts.py, each host with its own /tmp/ray). Two workers spread over the
hosts finetune, and run GRPO with a reward module shipped in the job's working directory; then two pretrain, node2
is lost mid-run, and Ray restarts the workers on the host that is left, which resume from the newest checkpoint and
finish the run."""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers.hosts import SUBNET, HostsError, TwoHosts
from tests.helpers.launched import REPO, SFT_RUN, TINY, running, steps_logged

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

RAY = shutil.which("ray", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
HEAD = f"{SUBNET}.1"  # node1


@pytest.fixture(scope="module")
def ray_hosts(tmp_path_factory):
    """(the two hosts, the environment `ray job submit` on node1 needs); everything is stopped with the hosts."""
    if RAY is None:
        pytest.fail("no `ray` command: install the ray extra (pip install -e '.[ray]', part of '.[dev]')", pytrace=False)
    hosts = TwoHosts(tmp_path_factory.mktemp("ray-hosts"), private=("/tmp/ray",))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": f"http://{HEAD}:8265"}
    with running(hosts, HostsError, start=lambda: start_ray(hosts, env)):
        yield hosts, env


def start_ray(hosts: TwoHosts, env: dict) -> None:
    """The hosts, a Ray head on node1 and a worker node on node2; HostsError once one does not come up."""
    hosts.start()
    for host, start in (("node1", ["--head", "--port=6379", "--dashboard-host=0.0.0.0"]), ("node2", [f"--address={HEAD}:6379"])):
        started = hosts.run(host, [RAY, "start", *start, f"--node-ip-address={hosts.address[host]}", "--num-cpus=2"],
                            env=env, capture_output=True, text=True, timeout=300)
        if started.returncode:
            raise HostsError(f"ray start on {host} failed: {started.stderr[-2000:]}")
    problem = accepts_jobs(hosts, env, timeout_s=150)  # the job server and its agent come up after `ray start`
    if problem:
        raise HostsError(f"the Ray head takes no job: {problem[-2000:]}")


def accepts_jobs(hosts: TwoHosts, env: dict, timeout_s: float) -> str | None:
    """None once a trivial job submitted with `ray job submit` succeeds; else the last answer."""
    deadline, answer = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        done = hosts.run("node1", [RAY, "job", "submit", "--", "true"], env=env, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            return None
        answer = done.stderr or done.stdout
        time.sleep(2)
    return answer


def submit(ray_hosts, *command: str, options: tuple[str, ...] = ()) -> tuple[str, subprocess.Popen]:
    """`ray job submit [OPTIONS] -- COMMAND` started on node1: (its submission id, the process that follows it)."""
    hosts, env = ray_hosts
    submission = f"scalelm-test-{uuid.uuid4().hex[:12]}"
    return submission, hosts.popen("node1", [RAY, "job", "submit", f"--submission-id={submission}", *options, "--",
                                             *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def job_log(ray_hosts, submission: str) -> str:
    """The job's whole output: `ray job submit` can stop following it before its last lines (ray-project/ray#48701),
    `ray job logs` reads the file."""
    hosts, env = ray_hosts
    return hosts.run("node1", [RAY, "job", "logs", submission], env=env, capture_output=True, text=True, timeout=120).stdout


def test_ray_job_spread_over_two_hosts_finetunes(ray_hosts, chat, sft_start, tmp_path):
    run = tmp_path / "run"
    submission, job = submit(
        ray_hosts, sys.executable, "-m", "scalelm.launch.ray", "finetune", "--config", str(REPO / "configs/sft-tiny.yaml"),
        "--workers", "2", "--placement", "spread", f"data.train={chat['shards']}", f"train.init_from={sft_start}",
        f"log.dir={run}", *SFT_RUN, "train.steps=3", "train.eval_every=0")
    log, _ = job.communicate(timeout=600)
    assert job.returncode == 0, log[-3000:]
    assert "done: step 3" in job_log(ray_hosts, submission) and steps_logged(run) == [1, 2, 3]
    events = (run / "events.log").read_text()
    assert "started from the weights of" in events
    line = next(line for line in events.splitlines() if "2 ranks" in line)
    assert "node1: rank " in line and "node2: rank " in line, line  # one worker on each host
    assert (run / "checkpoints" / "step-00000003" / "manifest.json").is_file()


def test_ray_job_runs_grpo_with_a_reward_from_its_working_directory(ray_hosts, prompts, sft_start, tmp_path):
    """`ray job submit --working-dir DIR`: the reward module in DIR reaches the driver and every worker."""
    from tests.helpers.rl import RL

    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "my_rewards.py").write_text((REPO / "tests/helpers/rewards.py").read_text())
    run = tmp_path / "run"
    submission, job = submit(
        ray_hosts, sys.executable, "-m", "scalelm.launch.ray", "finetune", "--config", str(REPO / "configs/grpo-tiny.yaml"),
        "--workers", "2", "--placement", "spread", f"data.train={prompts}", f"train.init_from={sft_start}",
        f"log.dir={run}", *RL, "rl.reward=my_rewards:letter_e", "train.steps=2", options=("--working-dir", str(tmp_path / "job")))
    log, _ = job.communicate(timeout=600)
    assert job.returncode == 0, log[-3000:]
    assert "done: step 2" in job_log(ray_hosts, submission)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(0 <= r["reward_mean"] <= 1 for r in records)


def test_a_lost_host_ray_restarts_the_workers_on_the_other_and_they_resume(ray_hosts, pipeline, tmp_path):
    hosts, _ = ray_hosts
    steps, run = 60, tmp_path / "run"
    submission, job = submit(
        ray_hosts, sys.executable, "-m", "scalelm.launch.ray", "--config", str(REPO / "configs/tiny.yaml"), "--workers", "2",
        "--placement", "spread", "--max-failures", "2", f"data.train={pipeline['shards']}",
        f"data.tokenizer={pipeline['tokenizer']}", f"log.dir={run}", f"train.steps={steps}", "checkpoint.every=10",
        "parallel.timeout=10", *TINY)
    try:
        deadline = time.monotonic() + 600
        while not (run / "checkpoints" / "step-00000010").is_dir():  # mid-run, with a checkpoint to resume from
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-3000:]
            time.sleep(0.2)
        hosts.kill("node2")  # its raylet, its worker and the rest
        log, _ = job.communicate(timeout=600)
    finally:
        job.kill()
    assert job.returncode == 0, log[-3000:]
    output = job_log(ray_hosts, submission)
    assert f"done: step {steps}" in output
    assert steps_logged(run) == list(range(1, steps + 1))  # each step once, none lost
    events = (run / "events.log").read_text()
    resumed_at = int(events.split("resuming from ")[1].split("(step ")[1].split(")")[0])
    assert 10 <= resumed_at < steps  # the new workers went on from the checkpoint, not from scratch
    assert "2 ranks, node1: ranks 0-1" in events  # the restarted pair, both on the host that is left
    assert f"saved {run / 'checkpoints' / f'step-{steps:08d}'} (end of run" in events


def test_ray_job_generates_on_two_workers_what_one_process_does(ray_hosts, sft_start, tmp_path):
    from scalelm.generation.sampling import Sampling
    from scalelm.infer.generate import Prompt, generate_checkpoint

    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts.write_text('{"prompt": "The king"}\n{"prompt": "A"}\n')
    submission, job = submit(
        ray_hosts, sys.executable, "-m", "scalelm.launch.ray", "generate", "--workers", "2", "--placement", "spread",
        str(sft_start), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "6", "--seed", "5",
        "parallel.tensor=2")
    log, _ = job.communicate(timeout=600)
    assert job.returncode == 0, log[-3000:]
    assert "wrote 2 samples of 2 prompts" in job_log(ray_hosts, submission)
    alone = generate_checkpoint(sft_start, [Prompt(text="The king"), Prompt(text="A")],
                                Sampling(max_new_tokens=6, temperature=0.8, top_k=50, top_p=0.95, seed=5))
    assert [json.loads(line)["token_ids"] for line in out.read_text().splitlines()] == [r["token_ids"] for r in alone]
