"""`scalelm plan`'s memory model against the peak memory of tiny training runs on CPU ranks: within 20% on every
rank of every layout (the issue's acceptance test). How the peak is measured: workloads.peak_memory.

The model (4 layers x 512, vocabulary 8000, sequences of 128) is big enough that what the plan models, 270 to
560 MB a rank, dwarfs what it does not (Python's and the engines' own objects, a few tens of MB). One step
reaches the peak, except under ZeRO-3, whose first step only traces the order in which it fetches parameters
(releasing each after use): it takes two. The layouts of one world size run one after the other in the same
ranks, to pay for starting them once.

The LoRA layouts (rank 8 on all four linears of each layer; `train.init_from` is only what validation asks for:
nothing is loaded) check the frozen base: its weights held, but no gradient, master copy, moments or bucket for
them, and the activations the adapters keep instead of the frozen linears' inputs. ZeRO-3 partitions the frozen
weights; tensor parallelism with sequence parallelism and dropout checks the gathered inputs and the masks. At
100 to 230 MB a rank they leave less room for what the plan does not model, and still measure within 7%."""

import pytest

from scalelm.parallel.plan import plan
from tests.helpers.ranks import run_ranks
from tests.helpers.workloads import MEMORY_MODEL as MODEL
from tests.helpers.workloads import MEMORY_VOCAB as VOCAB
from tests.helpers.workloads import peak_memory, tiny_config

pytestmark = pytest.mark.xdist_group("plan_memory")  # one worker: the layouts share their ranks

LORA = ["train.init_from=base", "finetune.lora.rank=8", "finetune.lora.targets=[qkv,proj,fc1,fc2]"]
LAYOUTS = {  # name: (world size, overrides, steps); single accumulates 2 micro-batches, the others 1 each
    "single": (1, [], 1),
    "dp2-zero2": (2, ["parallel.zero_stage=2"], 1),
    "dp2-zero3": (2, ["parallel.zero_stage=3"], 2),
    "tp2": (2, ["parallel.tensor=2"], 1),
    "pp2": (2, ["parallel.pipeline=2"], 1),
    "lora-single": (1, LORA, 1),
    "lora-dp2-zero3": (2, LORA + ["parallel.zero_stage=3"], 2),
    "lora-tp2-sp-dropout": (2, LORA + ["parallel.tensor=2", "parallel.sequence_parallel=true", "finetune.lora.dropout=0.1"], 1),
}


@pytest.fixture(scope="module")
def measured() -> dict[str, list[dict]]:
    """{layout: what each rank's peak_memory reports}."""
    found = {}
    for world in sorted({world for world, _, _ in LAYOUTS.values()}):
        names = [name for name, (w, _, _) in LAYOUTS.items() if w == world]
        ranks = run_ranks(world, peak_memory, [(MODEL + LAYOUTS[name][1], LAYOUTS[name][2]) for name in names], VOCAB)
        found.update({name: [ranks[r][i] for r in range(world)] for i, name in enumerate(names)})
    return found


@pytest.mark.parametrize("name", LAYOUTS)
def test_planned_memory_is_within_20_percent_of_the_peak(measured, name):
    world, overrides, _ = LAYOUTS[name]
    cfg = tiny_config(MODEL + overrides)
    cfg.model.vocab_size = VOCAB
    p = plan(cfg, world, on_gpu=False)
    for rank, got in enumerate(measured[name]):
        memory = p.for_rank(rank)
        assert memory.total == pytest.approx(got["grown"], rel=0.2), (
            f"rank {rank}: planned {memory.total / 1e6:.0f} MB (held {memory.held_bytes / 1e6:.0f} + "
            f"{memory.peak_moment} {memory.moment_bytes(memory.peak_moment) / 1e6:.0f}), measured {got['grown'] / 1e6:.0f} MB "
            f"({got['built'] / 1e6:.0f} once built)")
