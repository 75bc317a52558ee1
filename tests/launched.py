"""What the launcher tests (SLURM, Ray) hand a run and read back from it."""

from pathlib import Path

from scalelm.train.log import read_records

# overrides of configs/tiny.yaml: a model that starts and steps fast, a record for every step
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "train.seq_len=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_every=0", "data.num_workers=0", "optim.warmup_steps=2",
        "log.every=1", "log.tensorboard=false"]

# a finetuning run's model (as pretrained by the sft_start fixture) and run settings, chat shards of 128 tokens
SFT_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4"]
SFT_RUN = ["train.seq_len=128", "train.micro_batch_size=2", "train.global_batch_size=4", "train.precision=fp32",
           "data.num_workers=0", "optim.warmup_steps=1", "optim.lr=3e-3", "log.every=1", "log.tensorboard=false"]


def steps_logged(run: Path) -> list[int]:
    """The training steps in RUN/metrics.jsonl, in file order (a resumed run keeps those up to its checkpoint)."""
    return [r["step"] for r in read_records(run) if "loss" in r]
