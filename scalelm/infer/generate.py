"""`scalelm generate CKPT`: sample text from a scalelm checkpoint on scalelm's own decoder (rollouts.py), in the
layout of the launch (one process, or ranks: --nproc-per-node, torchrun, SLURM, Ray), with no conversion.

    --prompt TEXT | --prompts FILE.jsonl ─tokenizer (--chat: the training template)─▶ generate ─▶ terminal | --out JSONL

A prompt file holds one JSON object a line: {"prompt": TEXT} or {"messages": [{"role", "content"}, ...]}. Each sample
becomes one line of --out: its prompt's index, the sample's index, the text, the token ids, both kinds of
log-probability (`logprobs`, `sampling_logprobs`: infer/sampling.py) and why it ended ("stop" or "length").
A Hugging Face folder, or `--backend hf`, is sampled with transformers instead (generate_hf.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from scalelm.checkpoint import store
from scalelm.config import load_config, validate
from scalelm.errors import ConfigError
from scalelm.infer.sampling import Sampling


@dataclass(frozen=True)
class Prompt:
    """A text to continue, or a conversation to answer (chat)."""

    text: str | None = None
    messages: tuple[dict, ...] | None = None


def read_prompts(path: Path) -> list[Prompt]:
    """The prompts of a JSONL file; ConfigError naming the line that is not one."""
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number}: not JSON ({e.msg}): write one object a line") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(Prompt(text=row["prompt"]))
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in row["messages"]):
            prompts.append(Prompt(messages=tuple(row["messages"])))
        else:
            raise ConfigError(f'{path}:{number}: give {{"prompt": TEXT}} or {{"messages": [{{"role": ..., "content": '
                              f'...}}, ...]}}')
    if not prompts:
        raise ConfigError(f"--prompts {path} holds no prompt")
    return prompts


def generate_checkpoint(path: Path, prompts: Sequence[Prompt], sampling: Sampling, chat: bool = False,
                        system: str | None = None, overrides: Sequence[str] = (), base: Path | None = None,
                        tokenizer: Path | None = None) -> list[dict] | None:
    """One record per sample (the --out line), in prompt order, on rank 0 (None on the others); collective."""
    from scalelm.checkpoint.resume import init_weights
    from scalelm.infer.rollouts import generate
    from scalelm.model.build import build_model
    from scalelm.objectives.next_token import NextToken
    from scalelm.parallel.engine import Engine
    from scalelm.parallel.topology import before_the_ranks_meet, env_rank, process_group

    with before_the_ranks_meet():
        cfg, manifest, job = prepared(path, prompts, sampling, chat, system, overrides, tokenizer, *env_rank()[:2])
    with process_group(cfg.parallel, cfg.train.seed) as layout:
        engine = Engine(cfg, layout, build_model(cfg, layout, cfg.model.vocab_size), NextToken(cfg))
        init_weights(cfg, engine, manifest.get("tokenizer_sha256"), base)
        rollouts = generate(engine, job.ids, job.sampling, job.eos, job.context, job.stopped)
        if layout.rank != 0:
            return None
        return [job.record(rollouts, i) for i in range(len(rollouts.finish))]


@dataclass
class _Job:
    """The prompts as token ids, and how their completions are told apart and read back."""

    sp: object  # sentencepiece.SentencePieceProcessor
    ids: list[list[int]]
    sampling: Sampling
    eos: set[int]
    context: int

    def text(self, token_ids: list[int]) -> str:
        text = self.sp.decode([t for t in token_ids if t not in self.eos])
        cuts = [text.find(s) for s in self.sampling.stop if s in text]
        return text[:min(cuts)] if cuts else text

    def stopped(self, token_ids: list[int]) -> bool:
        if not self.sampling.stop:
            return False
        # a stop text ends within the last tokens (each a character or more), or it would have stopped before
        text = self.sp.decode(token_ids[-(max(len(s) for s in self.sampling.stop) + 8):])
        return any(s in text for s in self.sampling.stop)

    def record(self, rollouts, i: int) -> dict:
        tokens = rollouts.completion(i)
        k = len(tokens)
        return {"prompt_index": int(rollouts.prompt_index[i]), "sample": i % self.sampling.num_samples,
                "text": self.text(tokens), "token_ids": tokens, "logprobs": rollouts.logprobs[i, :k].tolist(),
                "sampling_logprobs": rollouts.sampling_logprobs[i, :k].tolist(), "finish_reason": rollouts.finish[i]}


def prepared(path: Path, prompts: Sequence[Prompt], sampling: Sampling, chat: bool, system: str | None,
              overrides: Sequence[str], tokenizer: Path | None, rank: int, world: int):
    """(config, manifest, job) of a generation on `world` ranks, this one `rank`: every error before the ranks meet (a
    launcher calls it before it starts them, with rank -1, which prints no note)."""
    from scalelm.convert.source import checkpoint_tokenizer
    from scalelm.convert.vocab import specials
    from scalelm.data.chat import ChatEncoder
    from scalelm.data.tokenizer import load_tokenizer
    from scalelm.objectives import registry

    ckpt = store.resolve(Path(path))
    manifest = store.read_manifest(ckpt)
    trained = manifest.get("objective") or manifest["config"].get("finetune", {}).get("objective", "sft")
    if not registry.generates(trained) or not manifest["config"]["model"].get("causal", True):
        raise ConfigError(f"{ckpt} is not a causal language model (trained with {trained}): it scores text and "
                          f"generates none")
    cfg = load_config(None, list(overrides), base={**manifest["config"], "parallel": {}})
    cfg.train.init_from = str(ckpt)
    t, p = cfg.train, cfg.parallel
    dp = world // (p.tensor * p.pipeline) if world % (p.tensor * p.pipeline) == 0 else 1
    t.global_batch_size = t.micro_batch_size * dp
    validate(cfg, world_size=world)
    found = checkpoint_tokenizer(ckpt, manifest, tokenizer)
    if found is None:
        raise ConfigError(f"{ckpt} names no tokenizer: pass --tokenizer PATH")
    sp, ids = load_tokenizer(found), []
    for prompt in prompts:
        messages = prompt.messages or ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt.text}]
        if chat or prompt.messages:
            try:
                ids.append(ChatEncoder(sp).prompt(messages))
            except ValueError as e:
                raise ConfigError(f"{e} (drop --chat)") from None
        else:
            ids.append([sp.bos_id(), *sp.encode(prompt.text)])
    context = cfg.model.max_position_embeddings
    longest = max(len(i) for i in ids)
    if longest >= context:
        raise ConfigError(f"a prompt is {longest} tokens and the model's context is {context}: shorten it")
    if longest + sampling.max_new_tokens > context and rank == 0:
        print(f"scalelm: --max-new-tokens {sampling.max_new_tokens} is cut to {context - longest} for the longest "
              f"prompt: the model's context is {context} tokens", file=sys.stderr)
    marks = specials(found)
    eos = {marks.eos} | ({marks.end_of_turn} if marks.end_of_turn >= 0 else set())
    return cfg, manifest, _Job(sp, ids, sampling, eos, context)
