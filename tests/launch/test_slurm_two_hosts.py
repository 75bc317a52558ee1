"""`sbatch -N 2 slurm/pretrain.sh` on a real two-node SLURM (tests/local_slurm.py over tests/hosts.py: slurmctld on
node1, a slurmd on each host): one rank per node trains as two ranks on one host do; and when node2 is lost mid-run,
the survivor names the lost rank, SLURM finds the node down and requeues the job (--requeue), and once the node is
back the job resumes from its checkpoint."""

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.launched import ACROSS, REPO, losses, pretrain_args, running, steps_logged
from tests.helpers.local_slurm import LocalSlurm, SlurmError

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("two_hosts")]

TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20"]


@pytest.fixture(scope="module")
def slurm(two_hosts, tmp_path_factory):
    # node2 comes back after its loss: requeued jobs wait out the retry of what was sent to it (tests/local_slurm.py)
    with running(LocalSlurm(tmp_path_factory.mktemp("slurm2"), hosts=two_hosts, cred_expire=70), SlurmError) as cluster:
        cluster.env["SCALELM_PYTHON"] = sys.executable
        yield cluster


def submit(slurm: LocalSlurm, pipeline, run: Path, name: str, *extra: str) -> int:
    return slurm.sbatch([*TWO_NODES, f"--job-name={name}", f"--output={run}/%x-%j.out", str(REPO / "slurm/pretrain.sh"),
                         *pretrain_args(pipeline, run, *extra)[1:]], cwd=run)


def test_sbatch_on_two_nodes_trains_as_two_ranks_on_one_host(slurm, pipeline, across_on_one_host, tmp_path):
    job_id = submit(slurm, pipeline, tmp_path, "two", *ACROSS)
    job = slurm.wait(job_id, timeout_s=300)
    log = (tmp_path / f"two-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    assert "on 2 node(s): node[1-2], 2 ranks, rank 0 at node1:" in log and "done: step 4" in log
    assert "2 ranks, node1: rank 0; node2: rank 1" in (tmp_path / "events.log").read_text()
    assert len(losses(tmp_path)) == 4 and losses(tmp_path) == pytest.approx(losses(across_on_one_host), abs=1e-6)
    manifest = json.loads((tmp_path / "checkpoints" / "step-00000004" / "manifest.json").read_text())
    assert manifest["layout"]["world"] == 2


def test_a_lost_node_requeues_the_job_and_it_resumes_once_the_node_is_back(slurm, two_hosts, pipeline, tmp_path):
    steps = 40
    job_id = submit(slurm, pipeline, tmp_path, "lost", f"train.steps={steps}", "checkpoint.every=5", "parallel.timeout=10")
    out, deadline = tmp_path / f"lost-{job_id}.out", time.monotonic() + 300
    # mid-run, once step 10's checkpoint is committed (a save in the background may lag the steps logged)
    while not (tmp_path / "checkpoints" / "step-00000010").is_dir():
        assert time.monotonic() < deadline and slurm.job(job_id)["JobState"] in ("PENDING", "RUNNING"), \
            out.read_text()[-3000:] if out.exists() else slurm.job(job_id)
        time.sleep(0.1)
    lost_at = time.monotonic()
    two_hosts.kill("node2")  # the host is lost: its slurmd, its step and its rank
    while slurm.job(job_id)["JobState"] == "RUNNING":  # until SLURM finds the node down: the job fails and requeues
        assert time.monotonic() - lost_at < 120, slurm.logs()
        time.sleep(0.5)
    print(f"\nFIGURE SLURM: lost node -> job requeued: {time.monotonic() - lost_at:.1f} s")
    slurm.start_node("node2")  # and back, as after a reboot
    job = slurm.wait(job_id, timeout_s=400)
    log = out.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log[-4000:]
    lost = [line for line in log.splitlines() if line.startswith("scalelm: error:")]
    assert len(lost) == 1 and re.match(r"scalelm: error: rank 1 \(node2, pid \d+\) stopped answering in step \d+", lost[0]), lost
    assert steps_logged(tmp_path) == list(range(1, steps + 1))  # every step once: none lost, none twice
    resumed = int((tmp_path / "events.log").read_text().split("resuming from ")[1].split("(step ")[1].split(")")[0])
    assert resumed >= 10 and resumed % 5 == 0
