"""What each spawned rank runs in the distributed tests (module-level, so spawn can import them)."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from scalelm.config import load_config
from scalelm.model.gpt import GPT
from scalelm.model.spec import layer_spec, padded_vocab_size, transformer_config
from scalelm.parallel.gather import gather_tensor_parallel
from scalelm.parallel.grads import sum_sequence_parallel_grads
from scalelm.parallel.topology import destroy_distributed, init_distributed

VOCAB = 200
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "train.seq_len=16",
        "train.micro_batch_size=2", "train.global_batch_size=2", "train.precision=fp32"]


def tiny_config(overrides: list[str]):
    return load_config(None, TINY + overrides)


def forward_backward(overrides: list[str], seed: int = 0) -> dict:
    """One forward and backward of the tiny GPT on fixed tokens: the loss, and on rank 0 every whole gradient."""
    cfg = tiny_config(overrides)
    layout = init_distributed(cfg.parallel, seed)
    try:
        tc = transformer_config(cfg.model, cfg.parallel, on_gpu=False)
        model = GPT(cfg.model, tc, layer_spec(on_gpu=False), padded_vocab_size(VOCAB), seed)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        if cfg.parallel.sequence_parallel:
            sum_sequence_parallel_grads(model, tp_group)
        tokens = torch.randint(0, VOCAB, (cfg.train.micro_batch_size, cfg.train.seq_len + 1),
                               generator=torch.Generator().manual_seed(seed))
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        grads = {name: gather_tensor_parallel(p.grad, p, tp_group) for name, p in model.named_parameters()}
        return {"loss": loss.item(), "grads": grads if layout.rank == 0 else None}
    finally:
        destroy_distributed()


def train_steps(overrides: list[str], steps: int = 3, seed: int = 0) -> dict:
    """`steps` optimizer steps on fixed global batches; every rank reports the loss of each step.

    Each step's global batch is the same tokens for every layout; a data-parallel rank takes its
    contiguous share of it in micro-batches, so every layout averages gradients over the same samples."""
    from scalelm.config import validate
    from scalelm.parallel.engine import Engine

    cfg = tiny_config(overrides)
    layout = init_distributed(cfg.parallel, seed)
    try:
        validate(cfg, world_size=layout.world)
        engine = Engine(cfg, layout, VOCAB)
        t = cfg.train
        gen = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(steps):
            tokens = torch.randint(0, VOCAB, (t.global_batch_size, t.seq_len + 1), generator=gen)
            share = tokens.chunk(layout.data)[layout.dp_rank]
            micro = iter({"input_ids": m[:, :-1], "labels": m[:, 1:]} for m in share.split(t.micro_batch_size))
            losses.append(engine.train_step(micro))
        return {"losses": losses, "lr": engine.lr}
    finally:
        destroy_distributed()
