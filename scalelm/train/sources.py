"""Where a run's batches come from: a batch source, which the loop asks for each step's micro-batches.

    source.take(count)            this rank's next `count` micro-batches ([] on a rank that reads none: a pipeline's
                                  middle stages); every rank calls it, as a source may run the model (collective)
    source.state_dict()           its position, saved with every checkpoint (per data-parallel rank)
    source.load_state_dict(s)     exactly there again (the same layout)
    source.continue_from(states)  as near there as another data-parallel size or worker count allows; a note
    source.report()               what making the last step's batches measured, for its log line ({} for most;
                                  a rollout's rewards and sampling time)

`run_data(cfg, objective, layout, scored)` is what the loop asks first: whether the batches pack documents (the
model is built for it) and, once the engine exists, the run's source. `Loader` reads token shards (data/loader.py's
TokenLoader), `InHand` holds micro-batches already made (an evaluation's). `ReferencePass` transforms another
source's batches: it adds each document's log-prob by the engine's own model with its LoRA adapters off, the
reference of DPO under LoRA (its objective declares `reference`, and shards scored with a reference carry it
already). The rollout source of RL (rl/source.py) holds the engine and samples from it. What comes next plugs in
the same way: a masker (masked-LM) or a teacher (distillation) transforms the batches of the source it wraps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from scalelm.batch import Batch
from scalelm.data.loader import TokenLoader, loader_from_config
from scalelm.model.lora import adapters_off, has_adapters
from scalelm.objectives import Output
from scalelm.objectives.documents import document_logps
from scalelm.rl.source import rollout_source


class BatchSource(Protocol):
    def take(self, count: int) -> list[Batch]: ...

    def state_dict(self) -> dict | None: ...

    def load_state_dict(self, state: dict) -> None: ...

    def continue_from(self, states: list[dict | None]) -> str: ...

    def report(self) -> dict[str, float]: ...


class Loader:
    """A TokenLoader's micro-batches, on the ranks that read data (`reads`: not a pipeline's middle stages)."""

    def __init__(self, loader: TokenLoader, reads: bool):
        self.loader, self.reads = loader, reads
        self._batches = None  # started at the first take, so a state loaded before it counts

    def take(self, count: int) -> list[Batch]:
        if not self.reads:
            return []
        if self._batches is None:
            self._batches = iter(self.loader)
        return [next(self._batches) for _ in range(count)]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._batches = None

    def continue_from(self, states: list[dict | None]) -> str:
        note = self.loader.continue_from(states)
        self._batches = None
        return note

    def report(self) -> dict[str, float]:
        return {}


class InHand:
    """Micro-batches already made (an evaluation's windows, dealt out by it), as a source to transform: `take`
    returns them whatever the count; it has no position to save."""

    def __init__(self, batches: list[Batch]):
        self.batches = batches

    def take(self, count: int) -> list[Batch]:
        return self.batches

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass

    def continue_from(self, states: list[dict | None]) -> str:
        return ""

    def report(self) -> dict[str, float]:
        return {}


class ReferencePass:
    """`source`'s batches, each with its `reference`: every document's Σ log p over its targets by the engine's model
    with its adapters off (zeros on a first pipeline stage, which reads the batch but computes no loss). Collective:
    the reference is a forward pass of every stage."""

    def __init__(self, source: BatchSource, engine):
        if not has_adapters(engine.module):
            raise ValueError("a reference pass needs LoRA adapters to switch off: without them it is the policy itself")
        self.source, self.engine = source, engine

    def take(self, count: int) -> list[Batch]:
        micro = self.source.take(count)
        with adapters_off(self.engine.module):
            found = self.engine.forward_only(micro, count, Output.LOGPROBS)
        for batch, logps in zip(micro, found):
            if logps is None:
                batch["reference"] = torch.zeros(batch["labels"].shape)
            else:
                batch["reference"] = document_logps(logps, batch).cpu()
        return micro

    def state_dict(self) -> dict | None:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)

    def continue_from(self, states: list[dict | None]) -> str:
        return self.source.continue_from(states)

    def report(self) -> dict[str, float]:
        return self.source.report()


@dataclass
class RunData:
    """What a run trains on, known before its model is built: whether its batches pack documents (the model then takes
    their positions and ids), what it has to say in the log, and the batch source it makes once the engine exists."""

    documents: bool
    notes: list[str]
    source: Callable[[Any], BatchSource]  # engine -> the run's batch source


def run_data(cfg, objective, layout, scored: str | None) -> RunData:
    """The objective's data: token shards read by a loader of this data-parallel rank (`scored`: the SHA-256 of the
    model whose log-probs DPO's shards carry), or, for an objective that samples (RL), its rollouts (rl/source.py)."""
    if objective.samples:
        return RunData(False, [], lambda engine: rollout_source(cfg, engine))
    loader = loader_from_config(cfg, "train", layout.dp_rank, layout.data, scored)
    return RunData(loader.documents, [loader.packing()] if loader.chat else [], lambda engine: batch_source(loader, engine))


def batch_source(loader: TokenLoader, engine) -> BatchSource:
    """The run's source: `loader`'s batches, with the reference pass when the objective needs one (`referenced`)."""
    return referenced(Loader(loader, engine.reads_data), engine, carried=loader.reference is not None)


def referenced(source: BatchSource, engine, carried: bool) -> BatchSource:
    """`source`, wrapped in the reference pass when the engine's objective needs a reference and its batches do not
    carry one (`carried`: scored beside the shards), as under LoRA, whose base is the reference."""
    return ReferencePass(source, engine) if engine.objective.reference and not carried else source
