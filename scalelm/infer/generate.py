"""`scalelm generate CKPT`: sample text from a scalelm checkpoint on scalelm's own decoder (rollouts.py), in the
layout of the launch (one process, or ranks: --nproc-per-node, torchrun, SLURM, Ray), with no conversion.

    --prompt TEXT | --prompts FILE.jsonl ─tokenizer (--chat: the training template)─▶ generate ─▶ terminal | --out JSONL

A prompt file holds one JSON object a line: {"prompt": TEXT} or {"messages": [{"role", "content"}, ...]}. Each sample
becomes one line of --out: its prompt's index, the sample's index, the text, the token ids, both kinds of
log-probability (`logprobs`, `sampling_logprobs`: generation/sampling.py) and why it ended ("stop" or "length").
A Hugging Face folder, or `--backend hf`, is sampled with transformers instead (generate_hf.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from scalelm.errors import ConfigError

if TYPE_CHECKING:
    from scalelm.generation.sampling import Sampling

BASE_HELP = "a LoRA checkpoint's base, where it is not at the path the checkpoint names (its SHA-256 must match)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments (light to import: every `scalelm` command builds its parser), less how it is
    launched: `scalelm generate` adds --backend and --nproc-per-node, the Ray launcher its worker options."""
    p.add_argument("model", type=Path, metavar="MODEL", help="a checkpoint (step-* or checkpoint.dir), or a Hugging Face folder")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="the text to continue (with --chat: the user's message)")
    prompts.add_argument("--prompts", type=Path, metavar="FILE.jsonl",
                         help='one prompt a line: {"prompt": TEXT} or {"messages": [{"role": ..., "content": ...}, ...]}')
    p.add_argument("--out", type=Path, default=None, metavar="FILE.jsonl",
                   help="write one JSON line per sample (prompt_index, sample, text, token_ids, logprobs, "
                        "sampling_logprobs, finish_reason) instead of printing the texts")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 is off (default 50)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 is off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this fraction of the most likely one's "
                                                             "probability; 0 is off (default)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1, tokens already seen are made "
                                                                         "less likely; 1 is off (default)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end a sample where this text appears "
                                                                               "(it is cut from the text; repeatable)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same text, on any layout (default 0)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as the user's turn")
    p.add_argument("--system", default=None, help="with --chat: a system message before it")
    p.add_argument("--preflight", type=int, default=None, metavar="RANKS",
                   help="only check, for RANKS ranks, what they would check before they start (the checkpoint, the "
                        "layout, the tokenizer, the prompts), and exit: 0 if they can start, else one line saying why")
    p.add_argument("--tokenizer", type=Path, default=None, help="the SentencePiece model, where the checkpoint's is "
                                                                "not at the path it names")
    p.add_argument("--base", type=Path, default=None, help=BASE_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="a checkpoint: layout and precision, e.g. "
                                                                     "parallel.tensor=2 train.precision=fp32")


def sampling_of(args: argparse.Namespace) -> "Sampling":
    from scalelm.generation.sampling import Sampling

    return Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty,
                    tuple(args.stop), args.num_samples, args.seed)


def prompts_of(args: argparse.Namespace) -> list["Prompt"]:
    return read_prompts(args.prompts) if args.prompts else [Prompt(text=args.prompt)]


def check(args: argparse.Namespace, world: int) -> None:
    """What `world` ranks would each refuse, refused once before they start (by their launcher)."""
    prepared(args.model, prompts_of(args), sampling_of(args), args.chat, args.system, args.overrides, args.tokenizer,
             -1, world)


def run(args: argparse.Namespace) -> int:
    """The command on this rank: the samples written to --out, or printed, by rank 0. Collective."""
    prompts = prompts_of(args)
    records = generate_checkpoint(args.model, prompts, sampling_of(args), chat=args.chat, system=args.system,
                                  overrides=args.overrides, base=args.base, tokenizer=args.tokenizer)
    if records is None:  # not rank 0
        return 0
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {len(records)} samples of {len(prompts)} prompts to {args.out}")
        return 0
    for r in records:
        if len(records) > 1:
            print(f"--- prompt {r['prompt_index']}, sample {r['sample']} ({r['finish_reason']})")
        print(r["text"])
    return 0


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


def generate_checkpoint(path: Path, prompts: Sequence[Prompt], sampling: "Sampling", chat: bool = False,
                        system: str | None = None, overrides: Sequence[str] = (), base: Path | None = None,
                        tokenizer: Path | None = None) -> list[dict] | None:
    """One record per sample (the --out line), in prompt order, on rank 0 (None on the others); collective."""
    from scalelm.checkpoint.resume import init_weights
    from scalelm.generation.rollouts import generate
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


def prepared(path: Path, prompts: Sequence[Prompt], sampling: "Sampling", chat: bool, system: str | None,
              overrides: Sequence[str], tokenizer: Path | None, rank: int, world: int):
    """(config, manifest, job) of a generation on `world` ranks, this one `rank`: every error before the ranks meet (a
    launcher calls it before it starts them, with rank -1, which prints no note)."""
    from scalelm.checkpoint import store
    from scalelm.config import load_config, validate
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
