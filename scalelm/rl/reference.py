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
from scalelm.objectives.tokens import token_logps
from scalelm.parallel.topology import gather_objects


class Reference:
    def __init__(self, cfg, engine, tokenizer_sha256: str | None):
        self.policy, self.temperature, self.micro = engine, cfg.rl.temperature, cfg.train.micro_batch_size
        self.engine = engine if has_adapters(engine.module) else _frozen(cfg, engine, tokenizer_sha256)

    def logps(self, batches: list[Batch]) -> list[torch.Tensor]:
        """(b, s) log-probs of each micro-batch's labels by the reference; collective over the pipeline."""
        off = adapters_off(self.engine.module) if self.engine is self.policy else contextlib.nullcontext()
        reads = self.engine.reads_data
        with off:
            found = self.engine.forward_only(batches if reads else [], len(batches),
                                             Output.LOGPROBS if self.temperature == 1 else Output.LOGITS)
        out = []
        for batch, value in zip(batches, found if reads else [None] * len(batches)):
            if value is None:
                out.append(torch.zeros(batch["labels"].shape))
            elif self.temperature == 1:
                out.append(value.cpu())
            else:
                out.append(token_logps(value.float() / self.temperature, batch["labels"].to(value.device)).cpu())
        return out

    def completion_kl(self, n: int, batch_of) -> list[float]:
        """Σ_t (old - ref) of each of `n` completions, on every rank; `batch_of(indices)` makes their micro-batch.
        Data-parallel rank d takes completions d, d + dp, ...; a rank short of them runs a copy. Collective."""
        layout = self.policy.layout
        mine = list(range(layout.dp_rank, n, layout.data))
        count = -(-len(range(0, n, layout.data)) // self.micro)
        chunks = [mine[b * self.micro:(b + 1) * self.micro] or mine[:1] or [0] for b in range(count)]
        batches = [batch_of(chunk) for chunk in chunks]
        found = {}
        for chunk, batch, ref in zip(chunks, batches, self.logps(batches)):
            sums = ((batch["old_logps"] - ref) * batch["loss_mask"]).sum(1)
            found.update({i: float(sums[k]) for k, i in enumerate(chunk)})
        computes = self.engine.computes_loss and layout.tp_rank == 0
        merged = {i: v for part in gather_objects(found if computes else None) if part for i, v in part.items()}
        return [merged[i] for i in range(n)]


def _frozen(cfg, engine, tokenizer_sha256: str | None):
    """train.init_from's weights in an engine without an optimizer, on the policy's layout."""
    from scalelm.checkpoint.resume import init_weights
    from scalelm.model.build import build_model
    from scalelm.parallel.engine import Engine

    reference = Engine(cfg, engine.layout, build_model(cfg, engine.layout, cfg.model.vocab_size, False), engine.objective)
    init_weights(cfg, reference, tokenizer_sha256)
    return reference
