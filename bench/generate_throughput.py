"""Generation throughput: scalelm's decoder (generation/decode.py, on the training model's layers) next to transformers'
`generate` on the same weights (written as a Hugging Face folder), the same prompts and this machine, in one run.

    python bench/generate_throughput.py [--shapes tiny,125m] [--batches 1,32] [--new-tokens 128] [--prompt-tokens 16]
                                        [--layouts pp2,tp2]

Greedy decoding of exactly --new-tokens tokens per row (no end of text), fp32, on the CPU (or the first GPU). Per
shape and batch size: new tokens per second (the median of --repeats runs), time to the first token (a run of one
new token), the growth of the resident set's peak while decoding, and whether both produced the same tokens.
Shapes: tiny (configs/tiny.yaml, context 256) and 125m (configs/gpt3-125m.yaml, context 2048), a vocabulary of 8,000.
With --layouts, scalelm's decoder alone on two spawned CPU ranks in each layout (pp2: two pipeline stages, each step's
hidden state sent from one to the next; tp2: two tensor ranks), next to one process, in tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository, for tests.helpers' memory readings

from scalelm.config import load_config  # noqa: E402
from scalelm.convert.hf import write_hf_folder  # noqa: E402
from scalelm.convert.source import ScalelmModel  # noqa: E402
from scalelm.generation.rollouts import generate  # noqa: E402
from scalelm.generation.sampling import Sampling  # noqa: E402
from scalelm.model.build import build_model, canonical_parameters  # noqa: E402
from scalelm.objectives.next_token import NextToken  # noqa: E402
from scalelm.parallel.engine import Engine  # noqa: E402
from scalelm.parallel.topology import single_process  # noqa: E402
from scalelm.quiet import quiet_engines  # noqa: E402
from tests.helpers.workloads import memory_status, pin_mmap_threshold, reset_peak  # noqa: E402

VOCAB = 8000
SHAPES = {"tiny": ("configs/tiny.yaml", 256), "125m": ("configs/gpt3-125m.yaml", 2048)}


def measure(run, repeats: int) -> tuple[float, int, list]:
    """(median seconds, peak growth of the resident set in bytes, the last result) of `run()`."""
    times, peak, out = [], 0, None
    for _ in range(repeats):
        base = memory_status()["VmRSS"]
        reset_peak()
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
        peak = max(peak, memory_status()["VmHWM"] - base)
    return statistics.median(times), peak, out


def overrides(context: int) -> list[str]:
    return [f"model.vocab_size={VOCAB}", f"train.seq_len={context}", "train.precision=fp32", "train.micro_batch_size=1",
            "train.global_batch_size=1", "model.dropout=0", "model.attention_dropout=0"]


def bench_shape(name: str, batches: list[int], new: int, prompt: int, repeats: int) -> list[str]:
    path, context = SHAPES[name]
    cfg = load_config(Path(__file__).parents[1] / path, overrides(context))
    rows = []
    with single_process() as layout, tempfile.TemporaryDirectory() as folder:
        engine = Engine(cfg, layout, build_model(cfg, layout, VOCAB), NextToken(cfg))
        weights = {k: v.detach().clone() for k, v in canonical_parameters(engine.module)}
        write_hf_folder(ScalelmModel(cfg.model, weights, None, "bench"), Path(folder))
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        for batch in batches:
            ids = torch.randint(4, VOCAB, (batch, prompt), generator=torch.Generator().manual_seed(batch))
            prompts = ids.tolist()

            def ours(n: int):
                sampling = Sampling(max_new_tokens=n, temperature=0)
                return generate(engine, prompts, sampling, eos=set(), context=context, batch_size=batch).input_ids[:, prompt:]

            def theirs(n: int):
                with torch.no_grad():
                    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=0)[:, prompt:]

            figures = {}
            for who, run in (("scalelm", ours), ("transformers", theirs)):
                run(2)  # warm up
                seconds, peak, tokens = measure(lambda: run(new), repeats)
                first, _, _ = measure(lambda: run(1), repeats)
                figures[who] = (batch * new / seconds, first, peak, tokens)
            same = torch.equal(figures["scalelm"][3], figures["transformers"][3])
            (ts, fs, ps, _), (th, fh, ph, _) = figures["scalelm"], figures["transformers"]
            rows.append(f"{name:5} batch {batch:3}  scalelm {ts:9,.0f} tok/s  transformers {th:9,.0f} tok/s  "
                        f"ratio {ts / th:5.2f}   first token {1000 * fs:7.1f} / {1000 * fh:7.1f} ms   "
                        f"peak +{ps / 2**20:6.0f} / +{ph / 2**20:6.0f} MiB   same tokens: {'yes' if same else 'NO'}")
            print(rows[-1], flush=True)
    return rows


LAYOUTS = {"pp2": ["parallel.pipeline=2"], "tp2": ["parallel.tensor=2"]}


def bench_layouts(name: str, layouts: list[str], batches: list[int], new: int, prompt: int, repeats: int) -> None:
    from tests.helpers.decoding import decoding_speed
    from tests.helpers.ranks import run_ranks

    path, context = SHAPES[name]
    config = str(Path(__file__).parents[1] / path)
    for batch in batches:
        alone = run_ranks(1, decoding_speed, config, overrides(context), batch, new, prompt, repeats)[0]
        figures = [f"one process {alone:8,.0f}"]
        for layout in layouts:
            speed = run_ranks(2, decoding_speed, config, [*overrides(context), *LAYOUTS[layout]], batch, new, prompt,
                              repeats)[0]
            figures.append(f"{layout} {speed:8,.0f} ({speed / alone:4.2f})")
        print(f"{name:5} batch {batch:3}  scalelm tok/s: " + "   ".join(figures), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,125m")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", default=None, help="pp2,tp2: scalelm's decoder on two ranks, next to one process")
    args = parser.parse_args()
    quiet_engines(hf=True)
    pin_mmap_threshold()
    torch.manual_seed(0)
    print(f"greedy, {args.new_tokens} new tokens after {args.prompt_tokens}, fp32, "
          f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, "
          f"{torch.get_num_threads()} threads; figures: scalelm / transformers")
    batches = [int(b) for b in args.batches.split(",")]
    for shape in args.shapes.split(","):
        if args.layouts:
            bench_layouts(shape, args.layouts.split(","), batches, args.new_tokens, args.prompt_tokens, args.repeats)
        else:
            bench_shape(shape, batches, args.new_tokens, args.prompt_tokens, args.repeats)


if __name__ == "__main__":
    main()
