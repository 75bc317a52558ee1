"""RL runs for the tests (tests/rl): prompt shards the tiny model can answer, and a run on some ranks that returns
what the layout tests compare."""

from __future__ import annotations

import json
from pathlib import Path

# the session's tiny model (conftest.py sft_start) sampling 4 completions of 8 tokens per prompt, 8 per step
RL = ["finetune.objective=grpo", "rl.reward=tests.helpers.rewards:letter_e", "rl.group_size=4", "rl.max_new_tokens=8",
      "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=8", "train.eval_every=0",
      "train.precision=fp32", "data.num_workers=0", "optim.warmup_steps=1", "optim.lr=1e-2", "log.every=1",
      "log.tensorboard=false"]


def write_prompts(root: Path, n: int = 40) -> Path:
    """n plain-text prompts "The number i is" with answer i, as JSONL."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"The number {i} is", "answer": str(i)}) + "\n" for i in range(n)))
    return path


def rl_run(overrides: list[str]) -> dict | None:
    """`scalelm finetune` of the overrides on this rank; on rank 0, every step's record, the newest checkpoint's whole
    weights (LoRA merged) and its rollout's completions."""
    import os

    from scalelm.checkpoint import store
    from scalelm.convert.source import read_model
    from scalelm.train.finetune import load_finetune_config
    from scalelm.train.log import read_records
    from scalelm.train.loop import train

    cfg = load_finetune_config(None, overrides)
    if cfg.parallel.zero_stage == 3:
        from tests.helpers.decoding import partition_every_weight

        partition_every_weight()  # the tiny model's weights all fall under DeepSpeed's threshold for keeping whole
    train(cfg, "finetune")
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    ckpt = store.resolve(Path(cfg.checkpoint.dir or Path(cfg.log.dir) / "checkpoints"))
    rollout = store.read_manifest(ckpt)["loader"][0]["rollout"]
    return {"records": [r for r in read_records(cfg.log.dir) if "loss" in r],
            "weights": read_model(ckpt, verify=False).weights, "completions": rollout["completions"]}
