"""The reference a KL term compares the policy with (rl.kl_coef): the model the run started from.

    LoRA          the policy's own engine with its adapters off: the base, no second copy of the weights
    full finetune a second engine holding train.init_from's weights, forward only (twice the weights' memory, whole on
                  every data-parallel rank: it has no optimizer, so no ZeRO partition)

`logps(batches)` is each micro-batch's log-probs of its labels at the policy's temperature, on the ranks that compute
the loss (zeros where a pipeline stage computes none): grpo, dr_grpo and dapo weigh the KL per token in the loss.
`completion_kl(...)` is rloo's: Σ over a completion's tokens of (sampling log-prob - reference log-prob), each
data-parallel rank computing its share and every rank getting them all, for the penalty on its rewards.
"""

from __future__ import annotations

import contextlib

import torch

from scalelm.batch import Batch
from scalelm.model.lora import adapters_off, has_adapters
from scalelm.objectives import Output
from scalelm.parallel.shares import over_data_parallel


class Reference:
    def __init__(self, cfg, engine, tokenizer_sha256: str | None):
        self.policy, self.temperature, self.micro = engine, cfg.rl.temperature, cfg.train.micro_batch_size
        self.engine = engine if has_adapters(engine.module) else _frozen(cfg, engine, tokenizer_sha256)

    def _off(self):
        return adapters_off(self.engine.module) if self.engine is self.policy else contextlib.nullcontext()

    def logps(self, batches: list[Batch]) -> list[torch.Tensor]:
        """(b, s) log-probs of each micro-batch's labels by the reference; collective over the pipeline."""
        reads = self.engine.reads_data
        with self._off():
            found = self.engine.forward_only(batches if reads else [], len(batches), Output.LOGPROBS, self.temperature)
        return [torch.zeros(batch["labels"].shape) if value is None else value.cpu()
                for batch, value in zip(batches, found if reads else [None] * len(batches))]

    def completion_kl(self, n: int, batch_of) -> list[float]:
        """Σ_t (old - ref) of each of `n` completions, on every rank; `batch_of(rows)` makes their micro-batch (with
        old_logps and loss_mask). Collective."""
        def kl(batch: Batch, ref: torch.Tensor, k: int, row: int) -> float:
            return float(((batch["old_logps"][k] - ref[k].cpu()) * batch["loss_mask"][k]).sum())

        with self._off():
            return over_data_parallel(self.engine, n, self.micro, batch_of, Output.LOGPROBS, kl, self.temperature)


def _frozen(cfg, engine, tokenizer_sha256: str | None):
    """train.init_from's weights in an engine without an optimizer, on the policy's layout."""
    from scalelm.checkpoint.resume import init_weights
    from scalelm.model.build import build_model
    from scalelm.parallel.engine import Engine

    reference = Engine(cfg, engine.layout, build_model(cfg, engine.layout, cfg.model.vocab_size, False), engine.objective)
    init_weights(cfg, reference, tokenizer_sha256)
    return reference
