"""`scalelm eval MODEL --data SHARDS`: perplexity on the first N windows of a shard split, in order.

    perplexity = exp(mean over every target token of -log p(token | the tokens before it))

The target tokens are every token of text shards, and of chat shards those of finetune.train_on
(default: the assistant turns and their <|end|>), each conversation seen on its own.

On preference shards (`scalelm shard --preference`) the figures are DPO's instead: the policy's reward
accuracy (the share of pairs whose chosen reply it prefers over the rejected one more than its reference
does) and mean reward margin, against its reference: for a LoRA checkpoint the base, for a full one the
reference log-probs it was trained with (they must be beside the shards). A reward model
(finetune.objective=reward) reports its own accuracy (chosen scored above rejected) and margin, and a
classifier (finetune.objective=classify) on labelled texts its accuracy, macro-F1 and confusion matrix.

The windows are those the loader cuts (seq_len + 1 tokens, stride seq_len), read unshuffled by one
reader, so every layout and every engine sees the same tokens: a scalelm checkpoint is evaluated
in-framework with the parallel layout of the launch (micro-batch k goes to data-parallel rank
k mod dp), a Hugging Face folder with transformers, and the two numbers agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Sequence

import torch

from scalelm.checkpoint import store
from scalelm.data.loader import TokenLoader
from scalelm.errors import ConfigError, DataError


@dataclass
class Classification:
    """A classifier's figures on labelled texts: the confusion matrix (rows the class, columns the prediction)."""

    names: list[str]
    confusion: list[list[int]]
    windows: int
    engine: str

    @property
    def texts(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def accuracy(self) -> float:
        return sum(self.confusion[i][i] for i in range(len(self.names))) / max(self.texts, 1)

    @property
    def macro_f1(self) -> float:
        """The mean over classes of 2 TP / (2 TP + FP + FN); a class absent from both rows and columns counts 0."""
        k = len(self.names)
        scores = []
        for i in range(k):
            tp, row, column = self.confusion[i][i], sum(self.confusion[i]), sum(r[i] for r in self.confusion)
            scores.append(2 * tp / (row + column) if row + column else 0.0)
        return sum(scores) / k

    def line(self, split: str) -> str:
        width = max(len(n) for n in self.names)
        rows = [f"  {name:>{width}}  " + " ".join(f"{n:6d}" for n in row) for name, row in zip(self.names, self.confusion)]
        return (f"accuracy {100 * self.accuracy:.2f}%, macro-F1 {self.macro_f1:.4f} over {self.texts:,} {split} texts in "
                f"{self.windows} windows ({self.engine})\nconfusion (rows: class, columns: predicted "
                f"{', '.join(self.names)}):\n" + "\n".join(rows))


@dataclass
class Preferences:
    """DPO's figures on preference pairs, each a mean over the pairs."""

    loss: float
    pairs: int
    windows: int
    engine: str
    metrics: dict
    reference: bool = True  # False: a model not trained with DPO, its own log-probs alone

    def line(self, split: str) -> str:
        m, where = self.metrics, f"over {self.pairs:,} {split} pairs in {self.windows} windows ({self.engine})"
        if "score_chosen" in m:  # a reward model's own scores
            return (f"accuracy {100 * m['accuracy']:.2f}%, margin {m['margin']:.4f} (chosen {m['score_chosen']:.4f}, "
                    f"rejected {m['score_rejected']:.4f}; Bradley-Terry loss {self.loss:.6f}) {where}")
        likelier = (f"the chosen reply the likelier in {100 * m['chosen_likelier']:.2f}% (log-probs chosen "
                    f"{m['logps_chosen']:.3f}, rejected {m['logps_rejected']:.3f})")
        if not self.reference:
            return f"{likelier} {where}; no reference: a model not trained with DPO"
        return (f"reward accuracy {100 * m['reward_accuracy']:.2f}%, margin {m['reward_margin']:.4f} (chosen "
                f"{m['reward_chosen']:.4f}, rejected {m['reward_rejected']:.4f}; DPO loss {self.loss:.6f}); {likelier} "
                f"{where}")


@dataclass
class Perplexity:
    loss: float
    windows: int
    seq_len: int
    engine: str
    targets: int | None = None  # the target tokens the loss is the mean over (None: every token of the windows)
    accuracy: float | None = None  # the share of targets whose most likely next token is the right one

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def line(self, split: str) -> str:
        tokens = f"{self.windows * self.seq_len:,} tokens" if self.targets is None else f"{self.targets:,} target tokens"
        accuracy = f", next-token accuracy {100 * self.accuracy:.2f}%" if self.accuracy is not None else ""
        return (f"perplexity {self.perplexity:.4f} (loss {self.loss:.6f}{accuracy}) over {self.windows} {split} windows of "
                f"{self.seq_len} tokens ({tokens}; {self.engine})")


def windows_loader(sources: Sequence[str], split: str, seq_len: int, batch: int, tokenizer_sha256: str | None,
                   reference: str | None = None) -> TokenLoader:
    """The split's windows in order, `batch` at a time, by a single reader (with `reference`: the SHA-256 of the
    model whose scored log-probs preference windows carry)."""
    return TokenLoader(sources, split=split, seq_len=seq_len, micro_batch_size=batch, shuffle=False,
                       tokenizer_sha256=tokenizer_sha256, reference=reference)


def window_count(loader: TokenLoader, wanted: int | None, multiple: int) -> int:
    """`wanted` windows (all the split holds when None), rounded down to a multiple of micro-batch x data-parallel."""
    have = loader.windows()
    n = min(wanted or have, have)
    n -= n % multiple
    if n == 0:
        raise DataError(f"{loader.layout.sources[0]} ({loader.layout.split}) holds {have} windows of "
                        f"{loader.layout.seq_len + 1} tokens; evaluating needs at least {multiple} (micro-batch x "
                        f"data-parallel ranks): add data or use a smaller --batch-size")
    return n


@torch.no_grad()
def evaluate_hf(folder: Path, sources: Sequence[str], split: str, seq_len: int | None, batch: int,
                windows: int | None) -> Perplexity:
    """Perplexity of a Hugging Face folder, with transformers in fp32."""
    from transformers import AutoModelForCausalLM

    from scalelm.data.files import sha256_file

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    context = model.config.max_position_embeddings
    if seq_len and seq_len > context:
        raise ConfigError(f"--seq-len {seq_len} is longer than the model's context ({context} tokens)")
    seq_len = seq_len or context
    tokenizer = folder / "tokenizer.model"
    loader = windows_loader(sources, split, seq_len, batch, sha256_file(tokenizer) if tokenizer.is_file() else None)
    if loader.sets[0].pairs:
        raise ConfigError(f"{sources[0]} holds preference pairs, whose figures compare a policy with its reference: "
                          f"evaluate the scalelm checkpoint the export was made from")
    n = window_count(loader, windows, batch)
    total, targets, hits = 0.0, 0, 0
    for b in islice(iter(loader), n // batch):
        for input_ids, labels, mask in _documents(b):  # each conversation of a packed window on its own
            logits = model(input_ids=input_ids).logits.float()  # (B, L, V)
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            total += (losses * mask.flatten()).sum().item()
            targets += int(mask.sum())
            hits += int(((logits.argmax(-1) == labels) & mask).sum())
    return Perplexity(total / targets, n, seq_len, f"transformers {type(model).__name__}, fp32",
                      targets if loader.documents else None, hits / targets)


def _documents(batch: dict):
    """(input_ids, labels, loss_mask) per forward pass: the batch itself, or each document of its packed windows."""
    if "document_ids" not in batch:
        yield batch["input_ids"], batch["labels"], torch.ones_like(batch["labels"], dtype=torch.bool)
        return
    for row in range(batch["input_ids"].shape[0]):
        docs = batch["document_ids"][row]
        for doc in torch.unique(docs):
            keep = docs == doc
            yield (batch["input_ids"][row][keep][None], batch["labels"][row][keep][None],
                   batch["loss_mask"][row][keep][None])


def evaluate_checkpoint(path: Path, sources: Sequence[str], split: str, windows: int | None,
                        overrides: Sequence[str] = (), base: Path | None = None) -> Perplexity | None:
    """Perplexity of a scalelm checkpoint (any, weights-only too) in-framework, in the layout the launch and
    `overrides` (parallel.*, train.micro_batch_size, train.precision, ...) give; the result on rank 0. A LoRA
    checkpoint runs with its adapters on its base (found at `base`, or where the checkpoint names it). Collective."""
    from scalelm.checkpoint.resume import init_weights
    from scalelm.config import load_config, validate
    from scalelm.model.build import build_model
    from scalelm.parallel.engine import Engine
    from scalelm.parallel.topology import destroy_distributed, env_rank, init_distributed

    ckpt = store.resolve(Path(path))
    manifest = store.read_manifest(ckpt)
    _, world, _ = env_rank()
    # the layout is this launch's (parallel.* overrides), not the one that trained the checkpoint
    saved = {**manifest["config"], "parallel": {}}
    cfg = load_config(None, list(overrides), base=saved)
    t, p = cfg.train, cfg.parallel
    dp = world // (p.tensor * p.pipeline) if world % (p.tensor * p.pipeline) == 0 else 1
    t.global_batch_size, t.eval_every = t.micro_batch_size * dp, 0  # one micro-batch per rank per step
    cfg.train.init_from = str(ckpt)
    validate(cfg, world_size=world)
    loader = windows_loader(sources, split, t.seq_len, t.micro_batch_size, manifest.get("tokenizer_sha256"))
    objective = None
    head, labelled = cfg.finetune.head == "classification", loader.sets[0].labels is not None
    if head and (labelled, loader.sets[0].pairs) != ((True, False) if cfg.finetune.objective == "classify" else (False, True)):
        raise ConfigError(f"{ckpt} is a classification model ({cfg.finetune.objective}): evaluate it on "
                          f"{'labelled texts (`scalelm shard --labels`)' if cfg.finetune.objective == 'classify' else 'preference pairs'}")
    if labelled and not head:
        raise ConfigError(f"{sources[0]} holds labelled texts, and {ckpt} has no classification head: evaluate a "
                          f"classifier (finetune.objective=classify) on them")
    if loader.sets[0].labels is not None:  # a classifier's figures
        from scalelm.train.heads import Classify

        objective = Classify()
    if loader.sets[0].pairs:  # DPO's figures against the policy's reference
        objective, loader = _preference_objective(cfg, ckpt, manifest, sources, split, loader)
    n = window_count(loader, windows, t.micro_batch_size * dp)
    layout = init_distributed(cfg.parallel, t.seed)
    try:
        engine = Engine(cfg, layout, build_model(cfg, layout, cfg.model.vocab_size, loader.documents), objective,
                        train=False)
        init_weights(cfg, engine, manifest.get("tokenizer_sha256"), base)
        mine = (b for k, b in enumerate(islice(iter(loader), n // t.micro_batch_size)) if k % dp == layout.dp_rank)
        if loader.sets[0].labels is not None:
            labels = loader.sets[0].labels
            names = labels + [str(i) for i in range(len(labels), cfg.finetune.num_labels)]  # classes the data lacks
            return _classify(engine, objective, list(mine) if engine.reads_data else [], n // (t.micro_batch_size * dp),
                             names, n, layout, t.precision)
        loss = engine.eval_loss(mine, n // (t.micro_batch_size * dp))
        engine_name = f"scalelm tensor {layout.tensor} x pipeline {layout.pipeline} x data {layout.data}, {t.precision}"
        if objective is not None:
            metrics = {k: v for k, v in engine.step_metrics.items() if k != "pairs"}
            return Preferences(loss, engine.step_metrics["pairs"], n, engine_name, metrics,
                               reference=objective.reference_pass or "reference" in objective.fields) if layout.rank == 0 else None
        targets = engine.step_metrics["targets"] if loader.documents else None
        accuracy = engine.step_metrics["accuracy"]
        return Perplexity(loss, n, t.seq_len, engine_name, targets, accuracy) if layout.rank == 0 else None
    finally:
        destroy_distributed()


def _preference_objective(cfg, ckpt: Path, manifest: dict, sources: Sequence[str], split: str, loader: TokenLoader):
    """(objective, loader) for evaluating a checkpoint on preference pairs: DPO's against its reference, or a
    reward model's Bradley-Terry."""
    from scalelm.train.dpo import DPO

    t = cfg.train
    if cfg.finetune.head == "classification":  # a reward model: its scores alone
        from scalelm.train.heads import Reward

        return Reward(), loader
    if cfg.finetune.lora is not None:
        return DPO(cfg.finetune.dpo, reference_pass=True), loader
    reference = manifest.get("reference")
    if not reference:  # no rewards to measure: the model's own preference
        from scalelm.train.dpo import Likelihoods

        return Likelihoods(cfg.finetune.dpo), loader
    return DPO(cfg.finetune.dpo, reference_pass=False), windows_loader(
        sources, split, t.seq_len, t.micro_batch_size, manifest.get("tokenizer_sha256"), reference["model"]["sha256"])


def _classify(engine, objective, micro: list[dict], count: int, names: list[str], windows: int, layout,
              precision: str) -> Classification | None:
    """The confusion matrix of this rank's micro-batches' predictions, summed over ranks; on rank 0. Collective."""
    from scalelm.parallel.topology import gather_objects

    found = engine.forward_only(micro, count, objective.predictions)
    mine = torch.cat([f for f in found if f is not None]) if found and found[0] is not None else torch.zeros(0, 2)
    confusion = [[0] * len(names) for _ in names]
    if layout.tp_rank == 0:  # every tensor rank computes the same predictions: count one
        for predicted, cls in mine.tolist():
            confusion[int(cls)][int(predicted)] += 1
    every = gather_objects(confusion)
    total = [[sum(rank[i][j] for rank in every) for j in range(len(names))] for i in range(len(names))]
    engine_name = f"scalelm tensor {layout.tensor} x pipeline {layout.pipeline} x data {layout.data}, {precision}"
    return Classification(names, total, windows, engine_name) if layout.rank == 0 else None
