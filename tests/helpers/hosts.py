"""Two hosts on this one machine for the multi-node tests, made of Linux namespaces.

Each host is a process (`sleep`) holding a network namespace of its own, a UTS namespace (its own
hostname) and a mount namespace in which /etc/hosts is a file of this fixture's, naming both hosts. A veth
pair joins the two network namespaces, made inside the first and given to the second, so the machine's
own network is never touched: each host sees only its loopback and its end of the pair, and a process on
it can reach nothing but the other host. The files are the machine's, shared by both hosts as a
cluster's shared file system is, but for the `private` directories, each host's own (Ray's /tmp/ray).
Needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN), util-linux's unshare and nsenter, and iproute2's ip.

    with TwoHosts(tmp_path) as hosts:
        hosts.popen("node1", ["hostname"]).wait()

stop() kills every process left in either host (found by its network namespace) and with them the
namespaces and the pair.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SUBNET = "10.77.0"  # the hosts' addresses, which exist only inside their network namespaces
TOOLS = {"unshare": "util-linux", "nsenter": "util-linux", "ip": "iproute2"}


class HostsError(RuntimeError):
    pass


class TwoHosts:
    def __init__(self, root: Path, names: tuple[str, str] = ("node1", "node2"), private: tuple[str, ...] = ()):
        self.root, self.names, self.private = root, names, private  # private: directories each host has its own of
        self.address = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(names)}
        self._holders: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "TwoHosts":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "TwoHosts":
        missing = [f"{tool} ({package})" for tool, package in TOOLS.items() if not _which(tool)]
        if missing:
            raise HostsError(f"cannot make two hosts: {', '.join(missing)} not found; tools/install_slurm.sh installs them")
        self.root.mkdir(parents=True, exist_ok=True)
        hosts_file = self.root / "hosts"
        hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in self.address.items()))
        for name in self.names:
            mounts = [f"mount --bind {hosts_file} /etc/hosts"]
            for path in self.private:  # over a directory of the machine's, seen by none of the hosts as it is
                Path(path).mkdir(parents=True, exist_ok=True)
                (own := self.root / name / path.strip("/").replace("/", "-")).mkdir(parents=True, exist_ok=True)
                mounts.append(f"mount --bind {own} {path}")
            # NOTE: unshare execs sh, which execs sleep: the holder's pid is the namespaces' first process
            script = f"hostname {name} && {' && '.join(mounts)} && ip link set lo up && echo up && exec sleep infinity"
            holder = subprocess.Popen([_which("unshare"), "--net", "--uts", "--mount", "--propagation", "private",
                                       "--", "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self._holders[name] = holder
            if holder.stdout.readline().strip() != "up":
                raise HostsError(f"host {name} did not come up: {holder.stderr.read().strip() or holder.wait()}")
        first, second = self.names
        self._ip(first, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", str(self.pid(second)))
        for name, dev in ((first, "veth0"), (second, "veth1")):
            self._ip(name, "addr", "add", f"{self.address[name]}/24", "dev", dev)
            self._ip(name, "link", "set", dev, "up")
        return self

    def pid(self, host: str) -> int:
        return self._holders[host].pid

    def command(self, host: str, cmd: list[str], cwd: Path | None = None) -> list[str]:
        """`cmd` as run on `host`: in its network, UTS and mount namespaces, in `cwd` (default: this one)."""
        return [_which("nsenter"), "-t", str(self.pid(host)), "-n", "-u", "-m", f"--wd={cwd or os.getcwd()}", "--", *cmd]

    def popen(self, host: str, cmd: list[str], cwd: Path | None = None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, cmd, cwd), **kwargs)

    def run(self, host: str, cmd: list[str], cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, cmd, cwd), **kwargs)

    def processes(self, host: str) -> list[int]:
        """Every process on `host` but its holder: those whose network namespace is the holder's."""
        try:
            netns = os.readlink(f"/proc/{self.pid(host)}/ns/net")
        except OSError:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self.pid(host):
                try:
                    if os.readlink(entry / "ns/net") == netns:
                        found.append(int(entry.name))
                except OSError:
                    pass  # gone, or a kernel thread
        return found

    def kill(self, host: str, sig: int = signal.SIGKILL) -> list[int]:
        """Send `sig` to every process on `host` but its holder (a lost node: SIGKILL); the pids signalled."""
        pids = self.processes(host)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def stop(self, timeout_s: float = 10) -> None:
        for name, holder in self._holders.items():
            if holder.poll() is None:
                self.kill(name)
                deadline = time.monotonic() + timeout_s
                while self.processes(name) and time.monotonic() < deadline:
                    time.sleep(0.1)
                holder.kill()
            holder.wait()
            for stream in (holder.stdout, holder.stderr):
                stream.close()
        self._holders.clear()

    def _ip(self, host: str, *args: str) -> None:
        done = subprocess.run([_which("nsenter"), "-t", str(self.pid(host)), "-n", _which("ip"), *args],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise HostsError(f"ip {' '.join(args)} on {host} failed: {done.stderr.strip()}")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
