"""`sbatch slurm/pretrain.sh` on a real one-node SLURM started by the test (tests/local_slurm.py): two CPU ranks
over gloo; a job stopped by USR1 that requeues itself and finishes from its checkpoint, a finetuning job and an RL
one.
A job across two nodes, and one that loses a node, are tests/e2e/test_slurm_two_hosts.py's."""

import json
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.launched import REPO, SFT_RUN, TINY, running, steps_logged
from tests.helpers.local_slurm import LocalSlurm, SlurmError

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]

# Two tasks on the CPU: the script's GPU request is switched off, one core each.
CPU_JOB = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=20"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with running(LocalSlurm(tmp_path_factory.mktemp("slurm")), SlurmError) as cluster:
        cluster.env["SCALELM_PYTHON"] = sys.executable  # the job's ranks run this interpreter, as a user's venv would
        # A shell that ran a one-process job before has these; sbatch passes them on, and the script must not let
        # them make each task a rank 0 of its own.
        cluster.env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        yield cluster


def submit(slurm: LocalSlurm, pipeline, run: Path, name: str, *extra: str) -> int:
    return slurm.sbatch([*CPU_JOB, f"--job-name={name}", f"--output={run}/%x-%j.out", str(REPO / "slurm/pretrain.sh"),
                         "--config", str(REPO / "configs/tiny.yaml"), f"data.train={pipeline['shards']}",
                         f"data.tokenizer={pipeline['tokenizer']}", f"log.dir={run}", *TINY, *extra], cwd=run)


def test_usr1_checkpoints_requeues_and_finishes_from_the_checkpoint(slurm, pipeline, tmp_path):
    steps = 100
    job_id = submit(slurm, pipeline, tmp_path, "requeue", f"train.steps={steps}", "checkpoint.every=100000")
    deadline = time.monotonic() + 300
    while not steps_logged(tmp_path):  # training is under way: ask for the pre-timeout signal now
        assert time.monotonic() < deadline and slurm.job(job_id)["JobState"] in ("PENDING", "RUNNING"), \
            (tmp_path / f"requeue-{job_id}.out").read_text()[-3000:]
        time.sleep(0.2)
    slurm.signal(job_id, "USR1", batch=True)
    job = slurm.wait(job_id, timeout_s=400)
    log = (tmp_path / f"requeue-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", log[-3000:]
    stopped = int(log.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 0 < stopped < steps
    assert f"step-{stopped:08d} (step {stopped})" in log and f"done: step {steps}" in log
    assert f"step {steps}/{steps}: loss" in log  # a log file gets progress lines, not a redrawn bar
    logged = steps_logged(tmp_path)
    assert logged == list(range(1, steps + 1))  # every step once: none lost, none repeated
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert checkpoints == [f"step-{stopped:08d}", f"step-{steps:08d}"]


def test_sbatch_finetunes_when_asked(slurm, chat, sft_start, tmp_path):
    job_id = slurm.sbatch([*CPU_JOB, "--job-name=sft", f"--output={tmp_path}/%x-%j.out", str(REPO / "slurm/pretrain.sh"),
                           "finetune", "--config", str(REPO / "configs/sft-tiny.yaml"), f"data.train={chat['shards']}",
                           f"train.init_from={sft_start}", f"log.dir={tmp_path}", *SFT_RUN, "train.steps=3",
                           "train.eval_every=0"], cwd=tmp_path)
    job = slurm.wait(job_id, timeout_s=300)
    log = (tmp_path / f"sft-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    assert "done: step 3" in log and "started from the weights of" in log
    assert json.loads((tmp_path / "checkpoints" / "step-00000003" / "manifest.json").read_text())["layout"]["world"] == 2


def test_sbatch_runs_grpo_with_a_reward_from_the_working_directory(slurm, prompts, sft_start, tmp_path):
    from tests.helpers.rl import RL

    (tmp_path / "my_rewards.py").write_text((REPO / "tests/helpers/rewards.py").read_text())  # a user's module, here
    job_id = slurm.sbatch([*CPU_JOB, "--job-name=grpo", f"--output={tmp_path}/%x-%j.out", str(REPO / "slurm/pretrain.sh"),
                           "finetune", "--config", str(REPO / "configs/grpo-tiny.yaml"), f"data.train={prompts}",
                           f"train.init_from={sft_start}", f"log.dir={tmp_path}", *RL, "rl.reward=my_rewards:letter_e",
                           "train.steps=2"], cwd=tmp_path)
    job = slurm.wait(job_id, timeout_s=300)
    log = (tmp_path / f"grpo-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    assert "done: step 2" in log
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(0 <= r["reward_mean"] <= 1 for r in records)


def test_a_job_on_shards_that_do_not_fit_ends_in_one_line(slurm, chat, sft_start, tmp_path):
    job_id = slurm.sbatch([*CPU_JOB, "--job-name=unfit", f"--output={tmp_path}/%x-%j.out", str(REPO / "slurm/pretrain.sh"),
                           "finetune", "--config", str(REPO / "configs/sft-tiny.yaml"), f"data.train={chat['shards']}",
                           f"train.init_from={sft_start}", f"log.dir={tmp_path}", *SFT_RUN, "train.seq_len=64"], cwd=tmp_path)
    job = slurm.wait(job_id, timeout_s=300)
    log = (tmp_path / f"unfit-{job_id}.out").read_text()
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", log[-3000:]
    (line,) = log.splitlines()  # checked before srun started any rank: one line, nothing from the ranks or srun
    assert line.startswith(f"scalelm: error: {chat['shards']} (train) holds conversations") and \
        "longer than train.seq_len=64" in line


def test_sbatch_generates_on_tensor_parallel_ranks_what_one_process_does(slurm, sft_start, tmp_path):
    from scalelm.generation.sampling import Sampling
    from scalelm.infer.generate import Prompt, generate_checkpoint

    (tmp_path / "prompts.jsonl").write_text('{"prompt": "The king"}\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    job_id = slurm.sbatch([*CPU_JOB, "--job-name=gen", f"--output={tmp_path}/%x-%j.out", str(REPO / "slurm/pretrain.sh"),
                           "generate", str(sft_start), "--prompts", str(tmp_path / "prompts.jsonl"), "--out",
                           str(tmp_path / "out.jsonl"), "--max-new-tokens", "6", "--seed", "5", "parallel.tensor=2"],
                          cwd=tmp_path)
    job = slurm.wait(job_id, timeout_s=300)
    log = (tmp_path / f"gen-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    assert "wrote 2 samples of 2 prompts" in log
    ranks = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    alone = generate_checkpoint(sft_start, [Prompt(text="The king"), Prompt(messages=({"role": "user", "content": "Hi"},))],
                                Sampling(max_new_tokens=6, temperature=0.8, top_k=50, top_p=0.95, seed=5))
    assert [r["token_ids"] for r in ranks] == [r["token_ids"] for r in alone]
