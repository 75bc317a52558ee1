"""scalelm.parallel.plan and `scalelm plan`: GPT-3 175B on Megatron's published layout, layouts that do not fit,
layout arithmetic errors, the textbook terms of the memory model, and the command's sections and exit status.
(The model's CPU figures are checked against measured peaks in tests/parallel/test_plan_memory.py.)"""

import re
from pathlib import Path

import pytest

from scalelm.cli import main
from scalelm.config import load_config
from scalelm.errors import ConfigError
from scalelm.parallel.plan import (
    ALLREDUCE_BUCKET,
    GPUS,
    MAX_REUSE_DISTANCE,
    PREFETCH_BUCKET,
    REDUCE_BUCKET,
    layer_activations,
    plan,
)
from scalelm.parallel.plan_report import describe, layouts_that_fit

ROOT = Path(__file__).parents[2]
GPT3 = str(ROOT / "configs" / "gpt3-175b.yaml")
CLUSTER = ["--nodes", "128", "--gpus-per-node", "8", "--gpu", "a100"]  # Megatron's 1024 A100s (Narayanan et al. 2021)
A100 = GPUS["a100"][0]
SINGLE_GPU = ["parallel.tensor=1", "parallel.pipeline=1", "parallel.sequence_parallel=false"]


def gpt3(overrides: list[str] = ()):
    cfg = load_config(GPT3, list(overrides))
    cfg.model.vocab_size = 50257  # GPT-2's tokenizer, as in the paper
    return cfg


def test_gpt3_175b_on_megatrons_layout_is_175b_parameters_and_fits():
    cfg = gpt3()
    assert (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.train.global_batch_size) == (8, 16, 1536)
    p = plan(cfg, 1024)
    lines = describe(p, 128, 8, "a100", 0.4)
    billions = float(re.search(r"model: ([\d.]+)B parameters", "\n".join(lines)).group(1))  # as printed
    assert billions == pytest.approx(175, rel=0.01)
    assert p.fits(A100)
    assert p.micro_batches == 1536 // 8  # 8 data-parallel ranks
    assert p.memory.stage == "first"  # 16 micro-batches in flight outweigh the last stage's logits
    assert 10 * 2**30 < p.memory.total < 0.9 * A100
    # 6 P with P the parameters, 2048 tokens x 1536 sequences, plus attention and the head: ~3.4 EFLOP a step
    assert p.flops_per_step == pytest.approx(3.39e18, rel=0.01)


def test_a_layout_that_cannot_fit_says_so_and_layouts_that_fit_are_offered():
    cfg = gpt3(SINGLE_GPU + ["train.global_batch_size=2048"])  # the whole model on every GPU
    p = plan(cfg, 1024)
    assert not p.fits(A100)
    assert p.memory.held_bytes > 175e9 * 2  # bf16 weights alone are 350 GB
    found = layouts_that_fit(cfg, 1024, 8, A100)
    assert found
    for overrides, other in found:
        assert other.fits(A100)
        assert plan(load_config(GPT3, overrides.split() + ["train.global_batch_size=2048", "model.vocab_size=50257"]),
                    1024).fits(A100)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tensor=16", "parallel.pipeline=16"], 1000, "world size 1000 does not divide by parallel.tensor x "
                                                           "parallel.pipeline = 256"),
    (["parallel.pipeline=7"], 1024, "parallel.pipeline=7 does not divide model.num_layers=96"),
    (["train.global_batch_size=1540"], 1024, "train.global_batch_size=1540 is not a multiple of micro_batch_size x "
                                             "data_parallel = 1 x 8 = 8: use 1544"),
    (["train.micro_batch_size=5"], 1024, "train.global_batch_size=1536 is not a multiple of train.micro_batch_size=5"),
    (["parallel.zero_stage=3"], 1024, "parallel.zero_stage=3 does not work with parallel.pipeline=16"),
])
def test_layout_arithmetic_errors_are_one_clear_line(overrides, world, message):
    with pytest.raises(ConfigError) as info:
        plan(gpt3(overrides), world)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_activations_are_korthikantis_with_dropout_at_two_bytes():
    """Korthikanti et al. 2022: s·b·h·(10 + 24/t) bytes per layer, 34/t with sequence parallelism (without the
    5·a·s/h attention-score term that SDPA does not keep); full recomputation keeps the 2·s·b·h input."""
    cfg = gpt3(["model.dropout=0.1"])
    sbh = cfg.train.seq_len * cfg.train.micro_batch_size * cfg.model.hidden_size
    assert layer_activations(cfg.model, cfg, 2, "none") == pytest.approx(sbh * 34 / 8)
    cfg.parallel.sequence_parallel = False
    assert layer_activations(cfg.model, cfg, 2, "none") == pytest.approx(sbh * (10 + 24 / 8))
    assert layer_activations(cfg.model, cfg, 2, "full") == pytest.approx(2 * sbh)


def test_mixed_precision_holds_two_two_four_and_twelve_over_d_bytes_per_parameter():
    """bf16 under ZeRO-1 runs DeepSpeed's bf16 optimizer: bf16 weights and gradients (2 + 2), its fp32 gradient
    accumulator (4), and fp32 master weights and AdamW moments over the data-parallel ranks (12 / d)."""
    p = plan(gpt3(["parallel.tensor=8", "parallel.pipeline=1", "train.global_batch_size=1536"]), 1024)
    held = {t.name: t.bytes for t in p.memory.held}
    weights = held["weights"] / 2  # the parameters on one rank
    data = 1024 // 8
    assert held["fp32 gradients"] == 4 * weights
    assert held["fp32 master weights"] + held["AdamW moments"] == pytest.approx(12 * weights / data)
    assert {t.name: t.bytes for t in p.memory.moments["step"]}["bf16 gradients"] == 2 * weights
    zero3 = plan(gpt3(["parallel.pipeline=1", "parallel.zero_stage=3"]), 1024)
    held3 = {t.name: t.bytes for t in zero3.memory.held}
    assert held3["weights"] == pytest.approx(2 * weights / data)  # ZeRO-3 partitions the weights too


def test_deepspeed_defaults_are_the_ones_the_plan_assumes():
    import torch
    from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from scalelm.parallel.engine import deepspeed_config
    from scalelm.parallel.topology import Layout

    layout = Layout(rank=0, world=1, tensor=1, pipeline=1, data=1, tp_rank=0, dp_rank=0, pp_rank=0,
                    device=torch.device("cpu"))
    ours = deepspeed_config(load_config(None, []), layout)["zero_optimization"]
    assert set(ours) == {"stage", "contiguous_gradients"}  # the buckets are DeepSpeed's defaults
    zero = DeepSpeedZeroConfig(**ours)
    assert zero.reduce_bucket_size == REDUCE_BUCKET
    assert zero.prefetch_bucket_size == PREFETCH_BUCKET
    assert zero.max_reuse_distance == MAX_REUSE_DISTANCE
    assert MEMORY_OPT_ALLREDUCE_SIZE == ALLREDUCE_BUCKET


def test_cli_prints_the_sections_and_exits_0_when_it_fits(capsys):
    assert main(["plan", "--config", GPT3, *CLUSTER]) == 0
    out = capsys.readouterr().out
    for section in ("cluster: 128 nodes x 8 a100 = 1024 GPUs", "model: 174.6", "B parameters",
                    "layout: tensor 8 x pipeline 16 x data 8, ZeRO-1", "pipeline bubble", "memory per GPU",
                    "weights", "fp32 master weights", "AdamW moments", "gradients", "activations", "total",
                    "fits", "without recomputation", "with full recomputation", "PFLOP per step",
                    "at 40% MFU", "s per step", "tokens/s"):
        assert section in out, section


def test_cli_exits_1_and_suggests_layouts_when_it_does_not_fit(capsys):
    assert main(["plan", "--config", GPT3, *CLUSTER, *SINGLE_GPU, "train.global_batch_size=2048"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "layouts that fit" in out and "parallel.tensor=" in out


def test_cli_exits_1_on_a_layout_that_does_not_divide(capsys):
    assert main(["plan", "--config", GPT3, *CLUSTER, *SINGLE_GPU]) == 1  # 1536 sequences over 1024 ranks
    out = capsys.readouterr().out
    assert "this layout does not run on 1024 GPUs: train.global_batch_size=1536 is not a multiple" in out
    assert "layouts that fit" in out


GPT3_1B = str(ROOT / "configs" / "gpt3-1.3b.yaml")
LORA = ["finetune.lora.rank=16", "train.init_from=x"]  # the adapters on qkv and proj, LoRAConfig's default targets


def gpt3_1b(overrides: list[str] = ()):
    cfg = load_config(GPT3_1B, list(overrides))
    cfg.model.vocab_size = 50257
    return cfg


def test_lora_holds_the_frozen_weights_and_optimizer_state_only_for_the_adapters():
    """GPT-3 1.3B on 8 GPUs (data 8, bf16, ZeRO-1: DeepSpeed's bf16 optimizer), all weights trained or rank-16
    adapters on qkv and proj: r (in + out) = 16 x (2048 + 6144) + 16 x (2048 + 2048) a layer, 4.7M in all. The
    frozen weights are held as before (bf16); the fp32 master copy (4/d), AdamW's moments (8/d) and the fp32
    gradient accumulator (4, whole) are the adapters' alone."""
    full, lora = plan(gpt3_1b(), 8), plan(gpt3_1b(LORA), 8)
    adapters = 24 * 16 * ((2048 + 6144) + (2048 + 2048))
    assert lora.trainable == adapters == 4_718_592 and full.trainable == full.parameters == lora.parameters
    held, held_full = ({t.name: t.bytes for t in p.memory.held} for p in (lora, full))
    assert held["weights"] == pytest.approx(held_full["weights"] + 2 * adapters)
    assert held["AdamW moments"] == 8 * adapters / 8 and held["fp32 master weights"] == 4 * adapters / 8
    assert held["fp32 gradients"] == 4 * adapters
    optimizer = sum(held[k] for k in ("fp32 master weights", "AdamW moments", "fp32 gradients"))
    assert optimizer / sum(held_full[k] for k in ("fp32 master weights", "AdamW moments", "fp32 gradients")) < 0.004
    assert lora.memory.total < 0.65 * full.memory.total  # the fc1 and fc2 inputs are no longer kept either
    # no frozen weight's gradient: 24 L h^2 + 2 V h FLOPs a token less, 6 a token more for each adapter's parameter
    tokens = 512 * 2048
    saved = 24 * 24 * 2048**2 + 2 * 50304 * 2048 - 6 * adapters
    assert lora.flops_per_step == pytest.approx(full.flops_per_step - saved * tokens)
    lines = "\n".join(describe(lora, 1, 8, "h100", 0.4))
    assert "trainable: 4.72M parameters (0.36%), LoRA rank 16 on qkv, proj" in lines
    assert "trainable" not in "\n".join(describe(full, 1, 8, "h100", 0.4))


def test_lora_adapters_split_over_tensor_ranks_like_their_base_and_zero3_partitions_the_frozen_weights():
    """tensor 2: B of the column-parallel qkv and A of the row-parallel proj are split, the others whole; ZeRO-3
    partitions every weight, frozen ones too, but its gradient partition and buckets are the adapters'."""
    p = plan(gpt3_1b(LORA + ["parallel.tensor=2", "parallel.zero_stage=3"]), 8)
    per_rank = 24 * 16 * ((2048 + 6144 / 2) + (2048 / 2 + 2048))
    held = {t.name: t.bytes for t in p.memory.held}
    full = {t.name: t.bytes for t in plan(gpt3_1b(["parallel.tensor=2", "parallel.zero_stage=3"]), 8).memory.held}
    assert held["AdamW moments"] == pytest.approx(8 * per_rank / 4)  # 4 data-parallel ranks
    assert held["gradient partition"] == pytest.approx(2 * per_rank / 4)
    assert held["weights"] == pytest.approx(full["weights"] + 2 * per_rank / 4)
    assert held["reduce bucket"] == full["reduce bucket"] == REDUCE_BUCKET * 2  # on a GPU made whole all the same


def test_lora_activations_keep_the_adapters_inputs_and_intermediates_not_the_frozen_linears():
    """Per layer, in s·b·h elements: the norms' inputs (2), q, k, v (3), the attention output (1, which SDPA keeps)
    and the MLP's first output (4) as before; qkv's input for its A (1), not fc1's or fc2's (frozen linears keep no
    input); and each adapter's A x, r/h. With all four targets that is GPT-3's 16 again, plus 4 r/h."""
    cfg = gpt3_1b(LORA)
    sbh = cfg.train.seq_len * cfg.train.micro_batch_size * cfg.model.hidden_size
    assert layer_activations(cfg.model, cfg, 2, "none") == pytest.approx(2 * sbh * (11 + 2 * 16 / 2048))
    cfg.finetune.lora.targets = ["qkv", "proj", "fc1", "fc2"]
    assert layer_activations(cfg.model, cfg, 2, "none") == pytest.approx(2 * sbh * (16 + 4 * 16 / 2048))
    # dropout: a one-byte mask of each adapter's input on a GPU (1 + 1 + 1 + 4), and proj's dropped-out copy
    cfg.finetune.lora.dropout = 0.1
    assert layer_activations(cfg.model, cfg, 2, "none") == pytest.approx(sbh * (2 * (16 + 4 * 16 / 2048) + 7 + 2))


def test_a_checkpoint_in_the_background_holds_twelve_bytes_a_parameter_in_host_memory_split_over_its_writers():
    cfg = load_config(str(ROOT / "configs" / "gpt3-125m.yaml"), ["model.vocab_size=50257"])
    one = plan(cfg, 1)
    assert one.memory.snapshot == pytest.approx(12 * one.parameters)
    assert "1.40 GiB pinned" in "\n".join(describe(one, 1, 1, "h100", 0.4))
    eight = plan(cfg, 8)  # eight data-parallel writers, but one of them writes the 38.6M-parameter embedding whole
    assert eight.memory.snapshot == pytest.approx(12 * 50304 * 768)
    cfg.checkpoint.background = False
    blocking = plan(cfg, 1)
    assert blocking.memory.snapshot == 0 and "host memory" not in "\n".join(describe(blocking, 1, 1, "h100", 0.4))
    assert blocking.memory.total == one.memory.total  # host memory, not the GPU's
