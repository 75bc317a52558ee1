import random

import numpy as np
import torch
from megatron.core import tensor_parallel

from scalelm.checkpoint import rng
from scalelm.checkpoint.store import read_rank_tensors, write_tensors
from scalelm.config import ParallelConfig
from scalelm.parallel.topology import destroy_distributed, init_distributed


def draw() -> list:
    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(3).tolist()
    return [random.random(), np.random.rand(), torch.rand(2).tolist(), tracked]


def test_every_stream_comes_back_through_a_file(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    init_distributed(ParallelConfig(), seed=5)  # megatron's tracker lives in its parallel state
    try:
        draw()
        write_tensors(tmp_path / "rng.safetensors", *rng.capture())
        expected = draw()
        rng.reseed(99)
        assert draw() != expected
        rng.restore(*read_rank_tensors(tmp_path / "rng.safetensors"))
        assert draw() == expected
    finally:
        destroy_distributed()
