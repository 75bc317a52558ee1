"""torchrun across two real hosts (tests/hosts.py: two network namespaces on this machine, joined by a veth pair,
each with its own hostname): TP2 trains as on one host; a lost host, a stopped rank and a second run on the same
checkpoints each end with one line naming who is at fault, and the next run resumes."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scalelm.checkpoint import store
from scalelm.parallel.watchdog import beat_interval
from tests.helpers.launched import ACROSS, ENV, REPO, losses, pretrain_args, steps_logged

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("two_hosts")]

FAULTY = ["train.steps=2000", "checkpoint.every=5", "parallel.timeout=10"]  # a run that is still going when it is hurt


def torchrun(hosts, job: str, args: list[str], rendezvous: str = "c10d") -> list[subprocess.Popen]:
    """One torchrun per host, one rank each. c10d: the rendezvous picks rank 0's host; static: node1's rank is 0."""
    where = ["--rdzv-backend=c10d", "--rdzv-endpoint=node1:29400"] if rendezvous == "c10d" else \
        ["--master-addr=node1", "--master-port=29500"]
    return [hosts.popen(host, [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", *where,
                               f"--rdzv-id={job}", f"--node-rank={i}", "-m", "scalelm", *args],
                        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i, host in enumerate(hosts.names)]


def finish(nodes: list[subprocess.Popen], names, ok: bool = True) -> list[str]:
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for host, node, out in zip(names, nodes, outputs):
        assert (node.returncode == 0) == ok, f"{host} exited {node.returncode}:\n{out[-3000:]}"
    return outputs


def until_steps(run: Path, n: int, nodes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 300
    while len(steps_logged(run)) < n:
        assert all(node.poll() is None for node in nodes) and time.monotonic() < deadline, \
            "\n".join(node.communicate()[0][-2000:] for node in nodes)
        time.sleep(0.1)


def errors(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("scalelm: error:")]


def test_torchrun_tp2_across_two_hosts_trains_as_on_one(two_hosts, pipeline, across_on_one_host, tmp_path):
    finish(torchrun(two_hosts, "tp2", pretrain_args(pipeline, tmp_path, *ACROSS)), two_hosts.names)
    assert len(losses(tmp_path)) == 4 and losses(tmp_path) == pytest.approx(losses(across_on_one_host), abs=1e-6)
    # the rendezvous chose which host is rank 0; either way one rank ran on each
    line = next(line for line in (tmp_path / "events.log").read_text().splitlines() if "2 ranks" in line)
    assert "node1: rank " in line and "node2: rank " in line, line
    manifest = json.loads((tmp_path / "checkpoints" / "step-00000004" / "manifest.json").read_text())
    assert manifest["layout"]["world"] == 2


def test_a_lost_host_ends_the_run_naming_its_rank_and_the_same_command_resumes(two_hosts, pipeline, tmp_path):
    run = tmp_path / "run"
    args = pretrain_args(pipeline, run, *FAULTY, "train.steps=40")
    nodes = torchrun(two_hosts, "lost", args, rendezvous="static")
    until_steps(run, 12, nodes)
    lost_at = time.monotonic()
    two_hosts.kill("node2")  # every process of the host: its launcher and its rank
    out = nodes[0].communicate(timeout=120)[0]
    seconds = time.monotonic() - lost_at
    nodes[1].wait()
    print(f"\nFIGURE lost host -> survivor's exit: {seconds:.1f} s")
    assert nodes[0].returncode != 0 and len(errors(out)) == 1, out[-3000:]
    assert re.match(r"scalelm: error: rank 1 \(node2, pid \d+\) stopped answering in step \d+: its host is lost",
                    errors(out)[0]), errors(out)
    assert "exitcode  : 75" in out and seconds < 60

    outputs = finish(torchrun(two_hosts, "lost", args, rendezvous="static"), two_hosts.names)  # as a requeue would
    assert steps_logged(run) == list(range(1, 41)), outputs[0][-2000:]  # every step once: none lost, none twice
    resumed = int((run / "events.log").read_text().split("resuming from ")[1].split("(step ")[1].split(")")[0])
    assert resumed >= 10 and resumed % 5 == 0


def test_a_stopped_rank_times_out_and_a_second_run_on_its_checkpoints_is_refused(two_hosts, pipeline, tmp_path):
    run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    nodes = torchrun(two_hosts, "stopped", pretrain_args(pipeline, run, *FAULTY), rendezvous="static")
    until_steps(run, 6, nodes)
    rank0 = next(pid for pid in two_hosts.processes("node1") if b"torch.distributed.run" not in _cmdline(pid)
                 and b"scalelm" in _cmdline(pid))

    second = two_hosts.run("node2", [sys.executable, "-m", "scalelm", *pretrain_args(pipeline, tmp_path / "second",
                                                                                  f"checkpoint.dir={checkpoints}")],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and errors(second.stderr) == [
        f"scalelm: error: checkpoint.dir={checkpoints} is in use by another run: host node1, pid {rank0}, torchrun run "
        f"stopped, " + errors(second.stderr)[0].split("torchrun run stopped, ")[1]], second.stderr[-2000:]
    assert not (tmp_path / "second" / "metrics.jsonl").exists()

    stopped_at = time.monotonic()
    os.kill(rank0, signal.SIGSTOP)
    out = nodes[1].communicate(timeout=120)[0]
    seconds = time.monotonic() - stopped_at
    print(f"\nFIGURE SIGSTOP -> the survivor's timeout: {seconds:.1f} s (parallel.timeout=10)")
    assert nodes[1].returncode != 0 and len(errors(out)) == 1, out[-3000:]
    assert errors(out)[0].startswith(f"scalelm: error: rank 0 (node1, pid {rank0}) sent no heartbeat for 10 s "
                                     "(parallel.timeout) in step "), errors(out)
    # silence is counted from when the survivor last saw a beat change, up to one beat before the stop
    assert 10 - beat_interval(10) <= seconds < 40
    two_hosts.kill("node1")  # the stopped rank and its launcher: its hold on the checkpoints is left behind
    nodes[0].wait()

    # the same checkpoints from the other host: the hold is stale (not renewed since the stop), the run takes it over
    # the newest committed checkpoint, as a resume picks it: `latest` may still name the one before, when the stop
    # came between a background save's commit and its update of `latest`
    newest = int(store.committed(checkpoints)[0].name.split("-")[1])
    again = pretrain_args(pipeline, run, f"train.steps={newest + 2}", "parallel.timeout=10")
    resumed = two_hosts.run("node2", [sys.executable, "-m", "scalelm", *again], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = (run / "events.log").read_text()
    assert re.search(rf"took over checkpoint.dir's hold from host node1, pid {rank0}, torchrun run stopped: not renewed "
                     r"for \d+ s \(parallel.timeout=10\)", events), events
    assert f"resuming from {checkpoints / f'step-{newest:08d}'}" in events and steps_logged(run)[-3:] == [newest, newest + 1,
                                                                                                        newest + 2]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
