"""Ranks and process groups: the only module that reads RANK/WORLD_SIZE and decides who talks to whom.

One rank layout for megatron-core and DeepSpeed alike: tensor-parallel ranks vary fastest, then
data-parallel, then pipeline (rank = pp * (dp_size * tp_size) + dp * tp_size + tp). megatron's
parallel_state (order tp-dp-pp) builds the groups; DeepSpeed's PipeModelDataParallelTopology (axes
pipe, data, model) must describe the same grid, and `init_distributed` checks that it does before
anything trains. `MegatronMPU` hands DeepSpeed megatron's groups, so ZeRO shards over the
data-parallel group only.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from scalelm import compat
from scalelm.config import ParallelConfig
from scalelm.errors import ScalelmError


@dataclass(frozen=True)
class Layout:
    """This rank's place in the tensor x data x pipeline grid."""

    rank: int
    world: int
    tensor: int
    pipeline: int
    data: int
    tp_rank: int
    dp_rank: int
    pp_rank: int
    device: torch.device

    def deepspeed_topology(self):
        """DeepSpeed's description of the same grid (axes pipe, data, model), which its pipeline is built on."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pipeline, num_mp=self.tensor, num_dp=self.data)


def env_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (torchrun's RANK/WORLD_SIZE/LOCAL_RANK,
    or srun's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID); a lone process is rank 0 of 1."""
    env = os.environ
    return (int(env.get("RANK", env.get("SLURM_PROCID", 0))), int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1))),
            int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0))))


def init_distributed(parallel: ParallelConfig, seed: int) -> Layout:
    """Start torch.distributed (NCCL on GPU, gloo on CPU), build megatron's groups, check DeepSpeed's grid."""
    import deepspeed
    from megatron.core import parallel_state, tensor_parallel

    timeout = process_group_timeout(parallel.timeout)

    rank, world, local_rank = env_rank()
    # A lone process (no launcher) is rank 0 of 1 on a free local port; DeepSpeed reads these too.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()) if world == 1 else "29500")
    on_gpu = torch.cuda.is_available()
    if on_gpu:  # a rank sees its node's GPUs (index = local rank), or only its own when the scheduler binds one
        gpu = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(gpu)
    else:
        compat.use_cpu()
    if world == 1 and not dist.is_initialized():  # in memory: a lone process needs no port, cannot lose one to a race
        dist.init_process_group("nccl" if on_gpu else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    # Starts the group, or (Ray Train's workers, the lone process) takes over the one already started. NOTE: on a CPU
    # DeepSpeed builds its shared-memory op and prints that it did, a line of every rank no user asked for.
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False, rank=rank,
                                   world_size=world, timeout=timeout, verbose=False)
    tp, pp = parallel.tensor, parallel.pipeline
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    layout = Layout(rank=rank, world=world, tensor=tp, pipeline=pp, data=world // (tp * pp),
                    tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                    dp_rank=parallel_state.get_data_parallel_rank(),
                    pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                    device=torch.device("cuda", gpu) if on_gpu else torch.device("cpu"))
    theirs = layout.deepspeed_topology().get_coord(rank)
    if (theirs.pipe, theirs.data, theirs.model) != (layout.pp_rank, layout.dp_rank, layout.tp_rank):
        raise RuntimeError(f"rank {rank}: megatron puts it at pp={layout.pp_rank} dp={layout.dp_rank} "
                           f"tp={layout.tp_rank}, DeepSpeed at {theirs}")  # a bug in scalelm, not in the config
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return layout


def process_group_timeout(timeout: float) -> timedelta:
    """The process group's own: a backstop behind the watchdog (parallel/watchdog.py), and room for ranks that start unevenly."""
    return timedelta(seconds=max(1.5 * timeout, 60.0))


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


@contextmanager
def process_group(parallel: ParallelConfig, seed: int) -> Iterator[Layout]:
    """This rank's layout, its process group started (`init_distributed`) for the duration and destroyed after. A
    ScalelmError raised inside, which every rank may raise alike, is reported by one rank: the first to claim it,
    the others are made `quiet`."""
    layout = init_distributed(parallel, seed)
    try:
        yield layout
    except ScalelmError as e:
        e.quiet = not first_to_report(layout.rank)
        raise
    finally:
        destroy_distributed()


@contextmanager
def before_the_ranks_meet() -> Iterator[None]:
    """For checks every rank makes alike before any process group starts (the config, the data, the checkpoints): a
    ScalelmError raised inside is the same on every rank, and rank 0 reports it."""
    try:
        yield
    except ScalelmError as e:
        e.quiet = env_rank()[0] != 0
        raise


def first_to_report(rank: int) -> bool:
    """Whether this rank reports the run's error, which every rank may raise: the first to claim it in the
    rendezvous store does, the others stay quiet (True without other ranks, or when the store is gone with a lost
    host: then every rank says what it knows)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    try:
        return compat.default_store().compare_set("scalelm/error", "", str(rank)).decode() == str(rank)
    except Exception:  # noqa: BLE001 - a store that does not answer says nothing more than that it is gone
        return True


def rank_hosts() -> str:
    """Which host each rank runs on, as one line ("node1: ranks 0-7; node2: ranks 8-15"); collective."""
    hosts: dict[str, list[int]] = {}
    for rank, host in enumerate(gather_objects(socket.gethostname())):
        hosts.setdefault(host, []).append(rank)
    return "; ".join(f"{host}: rank{'s' * (len(ranks) > 1)} {_spans(ranks)}" for host, ranks in hosts.items())


def _spans(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now, for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def single_process(seed: int = 0) -> Iterator[Layout]:
    """A process group of this process alone (tensor = pipeline = data = 1) for the duration, for code that
    runs scalelm's model outside a launched job (conversion parity checks); the environment is restored after."""
    if dist.is_initialized():
        raise RuntimeError("single_process() inside a running process group")
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        layout = init_distributed(ParallelConfig(), seed)
        try:
            yield layout
        finally:
            destroy_distributed()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMPU:
    """DeepSpeed's `mpu` interface over megatron-core's parallel_state (for the engine without a
    pipeline; the pipeline engine takes the grid from its PipelineModule's topology)."""

    def __getattr__(self, name: str):
        from megatron.core import parallel_state

        aliases = {
            "get_model_parallel_rank": parallel_state.get_tensor_model_parallel_rank,
            "get_model_parallel_world_size": parallel_state.get_tensor_model_parallel_world_size,
            "get_model_parallel_group": parallel_state.get_tensor_model_parallel_group,
            "get_slice_parallel_rank": parallel_state.get_tensor_model_parallel_rank,
            "get_slice_parallel_world_size": parallel_state.get_tensor_model_parallel_world_size,
            "get_slice_parallel_group": parallel_state.get_tensor_model_parallel_group,
        }
        if name in aliases:
            return aliases[name]
        return getattr(parallel_state, name)  # get_data_parallel_*, get_tensor_model_parallel_*
