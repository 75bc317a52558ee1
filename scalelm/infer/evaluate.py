"""`scalelm eval MODEL --data SHARDS`: a model's figures on the first N windows of a shard split, in order.

What the figures are is the objective's (scalelm/objectives): the one the checkpoint was trained with, when the
shards are the kind it trains on, else the one that measures any language model on them. On text and chat shards
that is perplexity,

    perplexity = exp(mean over every target token of -log p(token | the tokens before it))

the target tokens being every token of text shards, and of chat shards those of finetune.train_on (default: the
assistant turns and their <|end|>), each conversation seen on its own. On preference shards (`scalelm shard
--preference`) a DPO policy reports its reward accuracy and margin against its reference (for a LoRA checkpoint
the base, for a full one the reference log-probs it was trained with, beside the shards), any other language model
how often it finds the chosen reply the likelier, and a reward model its own accuracy and margin; a classifier on
labelled texts reports its accuracy, macro-F1 and confusion matrix.

The windows are those the loader cuts (seq_len + 1 tokens, stride seq_len), read unshuffled by one
reader, so every layout and every engine sees the same tokens: a scalelm checkpoint is evaluated
in-framework with the parallel layout of the launch (micro-batch k goes to data-parallel rank
k mod dp), a Hugging Face folder with transformers, and the two numbers agree.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Sequence

import torch

from scalelm import objectives
from scalelm.checkpoint import store
from scalelm.config import load_config, validate
from scalelm.data.loader import TokenLoader
from scalelm.errors import ConfigError, DataError
from scalelm.objectives import EvalContext
from scalelm.objectives.reports import Perplexity


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
                        overrides: Sequence[str] = (), base: Path | None = None):
    """The figures of a scalelm checkpoint (any, weights-only too) in-framework, in the layout the launch and
    `overrides` (parallel.*, train.micro_batch_size, train.precision, ...) give: those of the objective it was trained
    with when the shards are the kind it trains on, else those any language model is measured with there
    (objectives/registry.py: for_evaluation); on rank 0. A LoRA checkpoint runs with its adapters on its base
    (found at `base`, or where the checkpoint names it). Collective."""
    from scalelm.checkpoint.resume import init_weights
    from scalelm.model.build import build_model
    from scalelm.parallel.engine import Engine
    from scalelm.parallel.topology import before_the_ranks_meet, env_rank, process_group
    from scalelm.train.sources import InHand, referenced

    with before_the_ranks_meet():
        cfg, ckpt, manifest, objective, loader, n = _evaluation(path, sources, split, windows, overrides, env_rank()[1])
    t, dp = cfg.train, cfg.train.global_batch_size // cfg.train.micro_batch_size
    with process_group(cfg.parallel, t.seed) as layout:
        engine = Engine(cfg, layout, build_model(cfg, layout, cfg.model.vocab_size, loader.documents,
                                                 objective.num_labels()), objective)
        init_weights(cfg, engine, manifest.get("tokenizer_sha256"), base)
        count = n // (t.micro_batch_size * dp)
        mine = (b for k, b in enumerate(islice(iter(loader), n // t.micro_batch_size)) if k % dp == layout.dp_rank)
        batches = list(mine) if engine.reads_data else []
        batches = referenced(InHand(batches), engine, carried=loader.reference is not None).take(count)
        context = EvalContext(split, n, t.seq_len, f"scalelm tensor {layout.tensor} x pipeline {layout.pipeline} x data "
                                                   f"{layout.data}, {t.precision}", loader.documents, layout.rank == 0,
                              loader.sets[0].labels)
        return objective.evaluate(engine, batches, count, context)


def _evaluation(path: Path, sources: Sequence[str], split: str, windows: int | None, overrides: Sequence[str],
                world: int):
    """(config, checkpoint, manifest, objective, loader, windows) of an evaluation on `world` ranks."""
    ckpt = store.resolve(Path(path))
    manifest = store.read_manifest(ckpt)
    # the layout is this launch's (parallel.* overrides), not the one that trained the checkpoint
    saved = {**manifest["config"], "parallel": {}}
    cfg = load_config(None, list(overrides), base=saved)
    t, p = cfg.train, cfg.parallel
    dp = world // (p.tensor * p.pipeline) if world % (p.tensor * p.pipeline) == 0 else 1
    t.global_batch_size, t.eval_every = t.micro_batch_size * dp, 0  # one micro-batch per rank per step
    cfg.train.init_from = str(ckpt)
    validate(cfg, world_size=world)
    loader = windows_loader(sources, split, t.seq_len, t.micro_batch_size, manifest.get("tokenizer_sha256"))
    reference = manifest.get("reference")
    trained = manifest.get("objective") or cfg.finetune.objective  # a checkpoint of an older scalelm names none
    objective = objectives.for_evaluation(cfg, trained, loader.sets[0], cfg.finetune.lora is not None or bool(reference),
                                          str(ckpt))
    if objective.reference and reference and cfg.finetune.lora is None:  # the log-probs it was trained against
        loader = windows_loader(sources, split, t.seq_len, t.micro_batch_size, manifest.get("tokenizer_sha256"),
                                reference["model"]["sha256"])
    n = window_count(loader, windows, t.micro_batch_size * dp)
    return cfg, ckpt, manifest, objective, loader, n
