"""A real SLURM cluster on this machine for the launcher tests: munged, slurmctld and slurmd from Debian's
packages, started as this user with their config, state and logs in one directory. One node on localhost, or
one on each of two hosts (tests/hosts.py: a slurmd on each, the controller on the first).

The settings are the ones that work in an unprivileged container (no cgroup delegation): processes
are tracked by /proc (proctrack/linuxproc), tasks are not bound (task/none), and requeued jobs may
start again after `cred_expire` seconds (AuthInfo cred_expire; 5, not the default 121).

NOTE: what SLURM could not tell a lost node (srun's kill of the job's step) it tells it again a minute later
(the controller's message retry), once it is back. A requeued job has the same job and step id, so a run
that started on that node before the retry is killed by it. The default credential lifetime (121 s) keeps
requeued jobs out for longer than that; a cluster whose nodes come back must keep cred_expire above 60.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from scalelm.parallel.topology import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
INSTALL = "tools/install_slurm.sh (Debian packages slurmctld slurmd slurm-client munge)"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


class SlurmError(RuntimeError):
    pass


class LocalSlurm:
    """One node on localhost; or, given `hosts` (tests/hosts.py), a node on each host, the controller on the first,
    every command run on it."""

    def __init__(self, root: Path, cpus: int = 2, hosts=None, cred_expire: int = 5):
        self.root, self.cpus, self.hosts, self.cred_expire = root, cpus, hosts, cred_expire
        self.nodes = dict(hosts.address) if hosts else {socket.gethostname().split(".")[0]: "127.0.0.1"}
        self.node = next(iter(self.nodes))  # the controller's
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout_s: float = 60) -> "LocalSlurm":
        missing = [d for d in DAEMONS + ("sbatch",) if not _which(d)]
        if missing:
            raise SlurmError(f"cannot start a local SLURM: {', '.join(missing)} not found; install with {INSTALL}")
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        self._daemon(["munged", "--force", f"--key-file={key}", f"--socket={self.root / 'munge.sock'}",
                      f"--pid-file={self.root / 'munged.pid'}", f"--log-file={self.root / 'log/munged.log'}",
                      f"--seed-file={self.root / 'munge.seed'}"])
        self.conf.write_text(self._slurm_conf())
        (self.root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        self._daemon(["slurmctld", "-f", str(self.conf)], on=self.node)
        for node in self.nodes:
            self.start_node(node)
        self.until_idle(timeout_s)
        return self

    def start_node(self, node: str) -> None:
        """slurmd of `node` (again, after its host was lost: the node is back)."""
        (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        self._daemon(["slurmd", "-f", str(self.conf), "-N", node], on=node)

    def until_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self._run(["sinfo", "-h", "-N", "-o", "%T"])
            if state.returncode == 0 and state.stdout.split() == ["idle"] * len(self.nodes):
                return
            time.sleep(0.5)
        raise SlurmError(f"the local SLURM nodes did not come up in {timeout_s:.0f} s: {self.logs()}")

    def _run(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        """`cmd` where the controller is reached: this host, or the controller's."""
        cmd, cwd = [_which(cmd[0]) or cmd[0], *cmd[1:]], kwargs.pop("cwd", None)
        if self.hosts:
            cmd, cwd = self.hosts.command(self.node, cmd, cwd), None
        return subprocess.run(cmd, cwd=cwd, env=kwargs.pop("env", self.env), capture_output=True, text=True, **kwargs)

    def _slurm_conf(self) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=scalelmtest", f"SlurmctldHost={self.node}({self.nodes[self.node]})", f"SlurmUser={_user()}",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "AuthType=auth/munge", f"AuthInfo=socket={r / 'munge.sock'},cred_expire={self.cred_expire}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool/%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.%n.pid'}",
            f"SlurmctldLogFile={r / 'log/slurmctld.log'}", f"SlurmdLogFile={r / 'log/slurmd.%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "SwitchType=switch/none", "MpiDefault=none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin", "ReturnToService=2", "JobRequeue=1", "KillWait=30", "MinJobAge=3600",
            "SlurmdTimeout=10",  # a node that stops answering is down after 10 s (its jobs fail and requeue), not 300
            "SchedulerParameters=sched_interval=2",  # a requeued job is looked at every 2 s, not 60
            *(f"NodeName={node} NodeAddr={address} CPUs={self.cpus} State=UNKNOWN" for node, address in self.nodes.items()),
            "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""])

    def _daemon(self, cmd: list[str], on: str | None = None) -> None:
        cmd = [_which(cmd[0]), *cmd[1:]]
        done = subprocess.run(self.hosts.command(on, cmd) if self.hosts and on else cmd, env=self.env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise SlurmError(f"{cmd[0]} did not start ({done.returncode}): {(done.stderr or done.stdout).strip()} {self.logs()}")

    def stop(self) -> None:
        self._run(["scancel", "--full", "--signal=KILL", "--user", _user()], timeout=60)
        for name in [f"slurmd.{node}" for node in self.nodes] + ["slurmctld", "munged"]:
            pid_file = self.root / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass

    def logs(self) -> str:
        return "; ".join(f"{p.name}: {p.read_text()[-600:]}" for p in sorted((self.root / "log").glob("*.log")))

    # ---- jobs ----------------------------------------------------------------------------------------

    def sbatch(self, args: list[str], cwd: Path) -> int:
        # a free rendezvous port: 20000 + job id (pretrain.sh's default) may be taken by a test running beside this one
        env = {**self.env, "MASTER_PORT": str(free_port())}
        done = self._run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        if done.returncode != 0:
            raise SlurmError(f"sbatch failed: {done.stderr.strip()}")
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self._run(["scontrol", "-o", "show", "job", str(job_id)])
        return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)

    def wait(self, job_id: int, timeout_s: float) -> dict[str, str]:
        """The job's record once it reaches a final state; SlurmError past the timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.get("JobState") in FINAL:
                return job
            time.sleep(1)
        raise SlurmError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout_s:.0f} s")

    def signal(self, job_id: int, sig: str, batch: bool = False) -> None:
        self._run(["scancel", f"--signal={sig}", *(["--batch"] if batch else []), str(job_id)], check=True)


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
