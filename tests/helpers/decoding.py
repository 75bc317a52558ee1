"""What the spawned ranks of the generation tests run: a tiny model's samples beside the training forward pass's
log-probs of the same sequences."""

from __future__ import annotations

import torch

from scalelm.generation.rollouts import generate
from scalelm.generation.sampling import Sampling
from scalelm.model.build import build_model
from scalelm.objectives import Output
from scalelm.objectives.next_token import NextToken
from scalelm.parallel.engine import Engine
from scalelm.parallel.topology import destroy_distributed, init_distributed
from tests.helpers.workloads import VOCAB, step, tiny_config, training_engine

CONTEXT = 48
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [3], [40, 41, 42, 43]]
# setting: (sampling, end-of-text ids); greedy runs every row to the context (past it, were it not cut)
SETTINGS = {"greedy": (dict(temperature=0, max_new_tokens=60), set()),
            "sampled": (dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3, num_samples=2,
                             max_new_tokens=10), {2})}


def samples_and_forward(overrides: list[str], batch_size: int = 32, masks: bool = True) -> dict:
    """{setting: (rollouts, [the training forward's log-probs of each sample's completion tokens])}. Without `masks`,
    as on an attention that takes none (Transformer Engine's): batches of prompts of one length."""
    if not masks:
        from scalelm.generation.decode import Stage

        Stage.masks = property(lambda self: False)  # in this rank's process only
    cfg = tiny_config([f"train.seq_len={CONTEXT}", *overrides])
    layout = init_distributed(cfg.parallel, 0)
    try:
        # ZeRO-3 partitions the weights of an engine that trains: generate gathers them, and leaves them partitioned
        zero3 = cfg.parallel.zero_stage == 3
        if zero3:  # every weight partitioned, however small (DeepSpeed keeps those under 1e5 elements whole)
            partition_every_weight()
        model = build_model(cfg, layout, VOCAB)
        engine = training_engine(cfg, layout, model) if zero3 else Engine(cfg, layout, model, NextToken())
        out = {}
        for name, (settings, eos) in SETTINGS.items():
            rollouts = generate(engine, PROMPTS, Sampling(**settings), eos=eos, context=CONTEXT, batch_size=batch_size)
            forward = []
            for i in range(len(rollouts.finish)):
                start, k = int(rollouts.prompt_lengths[i]), int(rollouts.completion_mask[i].sum())
                # the sequence, padded after its end to the context (one shape for the pipeline, even for sequence
                # parallelism), which a causal model's earlier positions do not see
                seq = torch.nn.functional.pad(rollouts.input_ids[i, :start + k], (0, CONTEXT + 1 - start - k))
                micro = [{"input_ids": seq[None, :-1], "labels": seq[None, 1:], "loss_mask": torch.ones(1, CONTEXT)}]
                (logprobs,) = engine.forward_only(micro, 1, Output.LOGPROBS)
                forward.append(None if logprobs is None else logprobs[0, start - 1:start - 1 + k])  # None: not the last stage
            out[name] = (rollouts, forward)
        if zero3:  # partitioned again after generating, and training goes on, generating between steps (as RL does;
            # each rank decodes its own number of steps, which ZeRO-3's trace of module calls must not record)
            assert all(p.numel() == 0 for p in engine.module.parameters()), "ZeRO-3's weights left whole"
            ids = torch.randint(0, VOCAB, (2, CONTEXT + 1), generator=torch.Generator().manual_seed(0))
            for _ in range(3):
                loss = step(engine, [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}] * engine.grad_accum)
                assert 0 < loss < 10, loss
                generate(engine, PROMPTS, Sampling(**SETTINGS["greedy"][0]), eos=set(), context=CONTEXT)
        return out
    finally:
        destroy_distributed()


def partition_every_weight() -> None:
    """In this rank's process: ZeRO-3 partitions every weight (stage3_param_persistence_threshold 0)."""
    from scalelm.parallel import engine

    made = engine.deepspeed_config

    def config(*args, **kwargs):
        out = made(*args, **kwargs)
        out["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return out

    engine.deepspeed_config = config


def decoding_speed(config: str, overrides: list[str], batch: int, new: int, prompt: int, repeats: int) -> float:
    """New tokens per second of scalelm's decoder on this launch's layout (greedy, no end of text), the median of
    `repeats` runs; bench/generate_throughput.py's layouts."""
    import statistics
    import time

    from scalelm.config import load_config

    cfg = load_config(config, overrides)
    layout = init_distributed(cfg.parallel, 0)
    try:
        engine = Engine(cfg, layout, build_model(cfg, layout, cfg.model.vocab_size), NextToken(cfg))
        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(4, cfg.model.vocab_size, (batch, prompt), generator=gen).tolist()
        sampling = Sampling(max_new_tokens=new, temperature=0)
        generate(engine, prompts, Sampling(max_new_tokens=2, temperature=0), eos=set(), context=cfg.train.seq_len)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            generate(engine, prompts, sampling, eos=set(), context=cfg.train.seq_len, batch_size=batch)
            times.append(time.perf_counter() - start)
        return batch * new / statistics.median(times)
    finally:
        destroy_distributed()
