"""Peak memory of tiny CPU runs against `scalelm.parallel.plan`'s model of it, layout by layout.

    python bench/plan_memory_probe.py [--steps 2] [--only single,pp2] [key=value ...]

Each layout trains a few steps on gloo ranks; each rank reports how far its memory rose above where it stood
before the engine was built (tests/helpers/workloads.py:peak_memory says how that is measured), beside the
plan's total for that rank (plan(..., on_gpu=False)) and the moment of the step the plan puts the peak at.
tests/parallel/test_plan_memory.py asserts the same within 20%; this prints the table, terms included.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository, for tests.helpers' spawned ranks

from scalelm.parallel.plan import plan
from tests.helpers.ranks import run_ranks
from tests.helpers.workloads import MEMORY_MODEL as MODEL
from tests.helpers.workloads import MEMORY_VOCAB as VOCAB
from tests.helpers.workloads import peak_memory, tiny_config

LAYOUTS = {  # name: (world size, overrides)
    "single": (1, []),
    "dp2-zero1": (2, ["parallel.zero_stage=1"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3"]),
    "tp2": (2, ["parallel.tensor=2"]),
    "tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "recompute-full": (1, ["train.activation_checkpointing=full"]),
}


def planned(overrides: list[str], world: int) -> list:
    """The plan's memory for each rank of the layout, in rank order (tensor fastest, then data, then pipeline)."""
    cfg = tiny_config(overrides)
    cfg.model.vocab_size = VOCAB
    p = plan(cfg, world, on_gpu=False)
    return [p.for_rank(rank) for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only", type=lambda names: names.split(","), default=list(LAYOUTS),
                        help=f"layouts to run, comma-separated (default all: {','.join(LAYOUTS)})")
    parser.add_argument("overrides", nargs="*", help="more overrides for every layout, e.g. model.hidden_size=768")
    args = parser.parse_args()
    if set(args.only) - set(LAYOUTS):
        parser.error(f"no layout {', '.join(sorted(set(args.only) - set(LAYOUTS)))}: choose from {', '.join(LAYOUTS)}")
    warnings.filterwarnings("ignore")
    by_world: dict[int, list[str]] = {}
    for name in args.only:
        by_world.setdefault(LAYOUTS[name][0], []).append(name)
    print(f"{'layout':16s} {'rank':>4s} {'measured':>9s} {'planned':>8s} {'ratio':>6s}  peak at   (MB; built = after the engine was made)")
    for world, names in by_world.items():
        runs = [MODEL + LAYOUTS[name][1] + args.overrides for name in names]
        measured = run_ranks(world, peak_memory, [(run, args.steps) for run in runs], VOCAB)  # [rank][layout]
        for i, (name, overrides) in enumerate(zip(names, runs)):
            for rank, memory in enumerate(planned(overrides, world)):
                got = measured[rank][i]
                print(f"{name:16s} {rank:4d} {got['grown'] / 1e6:9.0f} {memory.total / 1e6:8.0f} {memory.total / got['grown']:6.2f}  "
                      f"{memory.peak_moment:9s} built {got['built'] / 1e6:.0f} / {memory.held_bytes / 1e6:.0f} held; "
                      + ", ".join(f"{t.name} {t.bytes / 1e6:.0f}" for t in memory.held + memory.moments[memory.peak_moment]),
                      flush=True)


if __name__ == "__main__":
    main()
