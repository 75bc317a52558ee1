"""Launchers across two real hosts (tests/hosts.py: two network namespaces on this machine, joined by a
veth pair, each with its own hostname): torchrun's c10d rendezvous from each host."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hosts import HostsError, TwoHosts
from tests.launched import TINY

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("two_hosts")]

REPO = Path(__file__).resolve().parents[2]
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    two = TwoHosts(tmp_path_factory.mktemp("hosts"))
    try:
        two.start()
    except HostsError as e:
        two.stop()
        pytest.fail(str(e), pytrace=False)
    yield two
    two.stop()


def run_args(pipeline, run: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(REPO / "configs/tiny.yaml"), f"data.train={pipeline['shards']}",
            f"data.tokenizer={pipeline['tokenizer']}", f"log.dir={run}", *TINY, "train.steps=4",
            "checkpoint.every=4", *extra]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_torchrun_tp2_across_two_hosts_trains_as_on_one(hosts, pipeline, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV} | {"OMP_NUM_THREADS": "1"}
    across = tmp_path / "across"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                "--rdzv-backend=c10d", "--rdzv-endpoint=node1:29400", "--rdzv-id=tp2"]
    nodes = [hosts.popen(host, [*torchrun, f"--node-rank={i}", "-m", "scalelm", *run_args(pipeline, across, "parallel.tensor=2")],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, host in enumerate(hosts.names)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for host, node, out in zip(hosts.names, nodes, outputs):
        assert node.returncode == 0, f"{host}:\n{out[-3000:]}"

    one = tmp_path / "one"
    done = subprocess.run([sys.executable, "-m", "scalelm", *run_args(pipeline, one, "parallel.tensor=2"), "--nproc-per-node", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    assert len(losses(across)) == 4 and losses(across) == pytest.approx(losses(one), abs=1e-6)
    # the rendezvous chose which host is rank 0; either way one rank ran on each
    line = next(line for line in (across / "events.log").read_text().splitlines() if "2 ranks" in line)
    assert "node1: rank " in line and "node2: rank " in line, line
    manifest = json.loads((across / "checkpoints" / "step-00000004" / "manifest.json").read_text())
    assert manifest["layout"]["world"] == 2
