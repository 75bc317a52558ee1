"""RL throughput: a GRPO step's time split into sampling, scoring and training, and its sampling with scalelm's
decoder next to transformers' `generate` on the same weights (written as a Hugging Face folder), in one run.

    python bench/rl_throughput.py [--shapes tiny,125m] [--prompts 4] [--group 8] [--new-tokens 64]
                                  [--prompt-tokens 16] [--steps 3] [key=value ...]

Each step samples --group completions of each of --prompts random prompts (temperature 1, exactly --new-tokens new
tokens: no end of text), scores them (the built-in length reward, which costs nothing: what is left of "scoring" is
the gathering and the advantages) and takes one optimizer step on them (rl/source.py, objectives/policy.py), fp32, one
process. Figures are medians over --steps steps after one to warm up. transformers samples the same prompts, as many
completions each (num_return_sequences), with the same settings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from scalelm.config import load_config  # noqa: E402
from scalelm.convert.hf import write_hf_folder  # noqa: E402
from scalelm.convert.source import ScalelmModel  # noqa: E402
from scalelm.data.prompts import Prompt  # noqa: E402
from scalelm.model.build import build_model, canonical_parameters  # noqa: E402
from scalelm.objectives.registry import lookup  # noqa: E402
from scalelm.parallel.engine import Engine  # noqa: E402
from scalelm.parallel.topology import single_process  # noqa: E402
from scalelm.quiet import quiet_engines  # noqa: E402
from scalelm.rl.rewards import Rewards  # noqa: E402
from scalelm.rl.source import RolloutSource  # noqa: E402
from scalelm.train.optim import AdamW  # noqa: E402
from scalelm.train.schedule import Schedule  # noqa: E402

VOCAB = 8000
SHAPES = {"tiny": "configs/tiny.yaml", "125m": "configs/gpt3-125m.yaml"}


class RandomPrompts:
    """`take(n)` of a PromptSet: n prompts of random ids, a fresh set each time (seeded by the count)."""

    def __init__(self, length: int):
        self.length, self.count = length, 0

    def take(self, n: int) -> list[tuple[int, Prompt]]:
        self.count += 1
        ids = torch.randint(4, VOCAB, (n, self.length), generator=torch.Generator().manual_seed(self.count)).tolist()
        return [(i, Prompt(tuple(row), "", None, {}, False)) for i, row in enumerate(ids)]

    def state_dict(self) -> dict:
        return {}


def bench_shape(name: str, args: argparse.Namespace) -> None:
    completions = args.prompts * args.group
    context = args.prompt_tokens + args.new_tokens
    cfg = load_config(Path(__file__).parents[1] / SHAPES[name], [
        f"model.vocab_size={VOCAB}", f"model.max_position_embeddings={max(context, 128)}", f"train.seq_len={context}",
        "train.precision=fp32", f"train.micro_batch_size={min(completions, 8)}", f"train.global_batch_size={completions}",
        "finetune.objective=grpo", "rl.reward=length", f"rl.group_size={args.group}",
        f"rl.max_new_tokens={args.new_tokens}", "optim.warmup_steps=0", "model.dropout=0", "model.attention_dropout=0",
        *args.overrides])
    with single_process() as layout, tempfile.TemporaryDirectory() as folder:
        objective = lookup("grpo", "finetune.objective")(cfg)
        engine = Engine(cfg, layout, build_model(cfg, layout, VOCAB), objective, AdamW(cfg.optim), Schedule(cfg.optim))
        source = RolloutSource(cfg, engine, RandomPrompts(args.prompt_tokens), Rewards(cfg.rl),
                               lambda ids: " ".join(map(str, ids)), eos=set())
        split = []
        for step in range(args.steps + 1):
            started = time.perf_counter()
            micro = source.take(engine.grad_accum)
            taken = time.perf_counter()
            engine.forward_backward(micro)
            engine.optimizer_step()
            done = time.perf_counter()
            figures = source.report()
            if step:  # the first warms up
                split.append((figures["sampling_s"], figures["scoring_s"], taken - started - figures["sampling_s"]
                              - figures["scoring_s"], done - taken, done - started))
        sampling, scoring, rows, training, total = (statistics.median(column) for column in zip(*split))
        tokens = completions * args.new_tokens
        print(f"{name:5} GRPO step, {args.prompts} prompts x {args.group}, {args.new_tokens} new tokens: {total:6.2f} s = "
              f"sampling {sampling:6.2f} s ({100 * sampling / total:3.0f}%, {tokens / sampling:7,.0f} tok/s)  "
              f"scoring {1000 * scoring:5.1f} ms  rows {1000 * rows:5.1f} ms  "
              f"training {training:6.2f} s ({100 * training / total:3.0f}%, {completions * context / training:7,.0f} tok/s)",
              flush=True)

        weights = {k: v.detach().clone() for k, v in canonical_parameters(engine.module)}
        write_hf_folder(ScalelmModel(cfg.model, weights, None, "bench"), Path(folder))
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ids = torch.tensor([list(p.ids) for _, p in RandomPrompts(args.prompt_tokens).take(args.prompts)])

        def theirs() -> None:
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                            num_return_sequences=args.group, max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, pad_token_id=0)

        theirs()  # warm up
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            theirs()
            times.append(time.perf_counter() - started)
        hf_s = statistics.median(times)
        print(f"{name:5} sampling the same: scalelm {tokens / sampling:7,.0f} tok/s  transformers {tokens / hf_s:7,.0f} "
              f"tok/s  ratio {hf_s / sampling:4.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,125m")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.num_layers=2")
    args = parser.parse_args()
    quiet_engines(hf=True)
    torch.manual_seed(0)
    print(f"fp32, {'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, "
          f"{torch.get_num_threads()} threads, one process")
    for shape in args.shapes.split(","):
        bench_shape(shape, args)


if __name__ == "__main__":
    main()
