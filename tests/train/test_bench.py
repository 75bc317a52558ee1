"""The benchmarks run (at toy sizes) and print their figures; their numbers are not judged here."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"


def run(*args: str) -> str:
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_loader_benchmark_prints_figures():
    out = run(BENCH / "loader_throughput.py", "--tokens", "2", "--shard-size", "1MB", "--seq-len", "256")
    assert "TokenLoader (tar shards)" in out and "np.memmap reader" in out and "% of a step" in out


def test_tokenize_benchmark_prints_figures(pipeline):
    out = run(BENCH / "tokenize_throughput.py", "--docs", pipeline["docs"], "--tokenizer", pipeline["tokenizer"],
              "--repeats", "1")
    assert "M tokens/s/core" in out


def test_train_benchmark_prints_figures():
    out = run(BENCH / "train_throughput.py", "--shapes", "tiny", "--precisions", "fp32,bf16", "--steps", "6",
              "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "train.seq_len=32")
    assert "scalelm" in out and "plain loop" in out and "plain GPT" in out and "vs GPT" in out and "compiled" in out
    assert re.search(r"tiny: 2x64, seq 32, batch 16 +fp32 .*\n +tiny: 2x64, seq 32, batch 16 +bf16 ", out)


def test_checkpoint_benchmark_prints_figures(tmp_path):
    out = run(BENCH / "checkpoint_throughput.py", "--repeats", "1", "--dir", tmp_path, "model.num_layers=2",
              "model.hidden_size=64", "model.num_heads=4", "train.seq_len=32")
    assert "scalelm, blocking: training waits" in out and "scalelm, background: training waits" in out
    assert "scalelm, background: the write" in out and "torch.save of the same tensors" in out and "GB/s" in out
    assert not any(tmp_path.iterdir())  # it cleans up after itself


def test_convert_benchmark_prints_figures(tmp_path):
    out = run(BENCH / "convert_throughput.py", "--dir", tmp_path, "--new-tokens", "4", "model.num_layers=2",
              "model.hidden_size=64", "model.num_heads=4", "train.seq_len=32")
    assert "to-hf:" in out and "from-hf:" in out and "to-gguf q8_0" in out and "max |Δlogit|" in out and "tokens/s" in out


def test_packing_benchmark_prints_figures():
    out = run(BENCH / "packing_throughput.py", "--steps", "3", "--conversations", "2000", "model.num_layers=2",
              "model.hidden_size=64", "model.num_heads=4", "train.seq_len=512")
    assert "packed" in out and "padded to longest" in out and "target tokens/s" in out and "ratio" in out


def test_lora_benchmark_prints_figures(tmp_path):
    out = run(BENCH / "lora_throughput.py", "--quick", "--steps", "2", "--dir", tmp_path)
    rows = {}
    for line in out.splitlines():
        label, *cells = re.split(r"\s{2,}", line.strip())  # label, full, LoRA qkv+proj, ratio, LoRA all four, ratio
        rows[label] = cells
    for label in ("trainable parameters", "optimizer state", "AdamW moments", "fp32 master copies", "peak memory of a step",
                  "checkpoint size", "checkpoint save time", "tokens/s"):
        assert len(rows[label]) == 5, out
    for label in ("trainable parameters", "optimizer state", "checkpoint size"):  # deterministic, unlike the timings
        assert 0 < float(rows[label][2]) < 1 and 0 < float(rows[label][4]) < 1, out
    assert not any(tmp_path.iterdir())  # it cleans up after itself


def test_dpo_benchmark_prints_figures():
    out = run(BENCH / "dpo_throughput.py", "--steps", "3", "--pairs", "2000", "model.num_layers=2", "model.hidden_size=64",
              "model.num_heads=4", "train.seq_len=512")
    assert "packed" in out and "padded to longest" in out and "real tokens/s" in out
    assert "reference pass" in out and "scoring a step's windows once" in out


def test_rl_benchmark_prints_figures():
    out = run(BENCH / "rl_throughput.py", "--shapes", "tiny", "--steps", "1", "--new-tokens", "4", "--prompts", "2",
              "--group", "2", "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4")
    assert re.search(r"GRPO step, 2 prompts x 2, 4 new tokens: .* sampling .* scoring .* training", out)
    assert re.search(r"sampling the same: scalelm +[\d,]+ tok/s +transformers +[\d,]+ tok/s +ratio", out)
