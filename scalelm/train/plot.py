"""`scalelm plot RUN_DIR --out loss.png`: training and validation loss, the mean reward of an RL run, and throughput,
from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from scalelm.errors import DataError
from scalelm.train.log import read_records


def plot_run(run_dir: str | Path, out: str | Path) -> Path:
    """Draw RUN_DIR/metrics.jsonl into `out` (PNG, SVG or PDF by its suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found: give the log.dir of a `scalelm pretrain` run")
    records = read_records(run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train:
        raise DataError(f"{path} holds no training steps yet")
    rewarded = [r for r in train if r.get("reward_mean") is not None]  # RL: the reward is what rises
    fig, axes = plt.subplots(3 if rewarded else 2, 1, figsize=(8, 9 if rewarded else 6), sharex=True)
    loss_ax, speed_ax = axes[0], axes[-1]
    if rewarded:
        axes[1].plot([r["step"] for r in rewarded], [r["reward_mean"] for r in rewarded], color="tab:purple")
        axes[1].set_ylabel("mean reward")
        axes[1].grid(alpha=0.3)
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        loss_ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    speed_ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], color="tab:green")
    speed_ax.set_ylabel("tokens / s")
    speed_ax.set_xlabel("step")
    speed_ax.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
