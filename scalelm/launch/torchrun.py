"""`scalelm pretrain --nproc-per-node N`: start N local ranks through torchrun, each running the same command."""

from __future__ import annotations

import subprocess
import sys
from typing import Sequence

from scalelm.parallel.topology import free_port


def relaunch(nproc_per_node: int, argv: Sequence[str]) -> int:
    """Run `scalelm ARGV` as `nproc_per_node` ranks under torch.distributed.run; returns its exit status."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}",
           f"--master-port={port}", "--master-addr=127.0.0.1", "-m", "scalelm", *argv]
    return subprocess.call(cmd)
