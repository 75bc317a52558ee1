"""A real one-node SLURM cluster on localhost for the launcher tests: munged, slurmctld and slurmd from
Debian's packages, started as this user with their config, state and logs in one directory.

The settings are the ones that work in an unprivileged container (no cgroup delegation): processes
are tracked by /proc (proctrack/linuxproc), tasks are not bound (task/none), and requeued jobs may
start again after 5 s instead of the default 121 s (AuthInfo cred_expire).
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
    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = root, cpus
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
        self._daemon(["slurmctld", "-f", str(self.conf)])
        self._daemon(["slurmd", "-f", str(self.conf), "-N", self.node])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if state.returncode == 0 and state.stdout.strip() == "idle":
                return self
            time.sleep(0.5)
        raise SlurmError(f"the local SLURM node did not come up in {timeout_s:.0f} s: {self.logs()}")

    @property
    def node(self) -> str:
        return socket.gethostname().split(".")[0]

    def _slurm_conf(self) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=scalelmtest", f"SlurmctldHost={self.node}(127.0.0.1)", f"SlurmUser={_user()}",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "AuthType=auth/munge", f"AuthInfo=socket={r / 'munge.sock'},cred_expire=5",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log/slurmctld.log'}", f"SlurmdLogFile={r / 'log/slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "SwitchType=switch/none", "MpiDefault=none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin", "ReturnToService=2", "JobRequeue=1", "KillWait=30", "MinJobAge=3600",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""])

    def _daemon(self, cmd: list[str]) -> None:
        done = subprocess.run([_which(cmd[0]), *cmd[1:]], env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SlurmError(f"{cmd[0]} did not start ({done.returncode}): {(done.stderr or done.stdout).strip()} {self.logs()}")

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--signal=KILL", "--user", _user()], env=self.env, capture_output=True)
        for name in ("slurmd", "slurmctld", "munged"):
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
        done = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SlurmError(f"sbatch failed: {done.stderr.strip()}")
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], env=self.env, capture_output=True, text=True)
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
        subprocess.run(["scancel", f"--signal={sig}", *(["--batch"] if batch else []), str(job_id)],
                       env=self.env, check=True, capture_output=True)


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
