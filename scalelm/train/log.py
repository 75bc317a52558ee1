"""What a run writes for people: a progress bar (or, when stderr is not a terminal, as in a SLURM or
Ray log, a line every log.every steps), RUN_DIR/metrics.jsonl, TensorBoard, the resolved config,
and RUN_DIR/events.log (resumes, checkpoints, skipped steps, loss spikes), which also go to the terminal.

Only rank 0 writes; every other rank gets a RunLog that does nothing, so the loop never asks. A
resumed run (first_step > 0) keeps the records up to first_step and continues the files.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml
from tqdm import tqdm

from scalelm.config import Config, to_dict
from scalelm.data.files import make_dir


class RunLog:
    def __init__(self, cfg: Config, active: bool, total_steps: int, first_step: int = 0, stage: str = "pretrain"):
        self.active, self.every = active, cfg.log.every
        self.last: dict = {}
        if not active:
            return
        self.dir = make_dir(Path(cfg.log.dir), "log.dir")
        (self.dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.metrics = _continue_records(self.dir / "metrics.jsonl", first_step)
        self.events = open(self.dir / "events.log", "a" if first_step else "w")
        self.tensorboard = None
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.dir / "tensorboard"))
        self.lines = not sys.stderr.isatty()  # a log file gets lines, not a bar redrawn with carriage returns
        self.bar = tqdm(total=total_steps, initial=first_step, desc=stage, unit="step", dynamic_ncols=True,
                        disable=self.lines)
        self.started = time.time()

    def step(self, record: dict) -> None:
        """After each optimizer step: {step, loss, lr, grad_norm, tokens_per_s, mfu, mfu_megatron, mem}."""
        self.last = record
        if not self.active:
            return
        summary = (f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s']:,.0f} tok/s"
                   + (f" reward acc {100 * record['reward_accuracy']:.0f}%" if record.get("reward_accuracy") is not None
                      else "")
                   + (f" MFU {100 * record['mfu']:.1f}% (PaLM)" if record["mfu"] is not None else ""))
        self.bar.update(1)
        self.bar.set_postfix_str(summary, refresh=False)
        if record["step"] % self.every == 0 or record["step"] == self.bar.total:
            self._write(record)
            if self.lines:
                self._say(f"step {record['step']}/{self.bar.total}: {summary}")

    def eval(self, step: int, val_loss: float, perplexity: float, metrics: dict | None = None) -> None:
        """After a validation: its loss, and its perplexity and next-token accuracy; for DPO (whose loss is no cross
        entropy) its reward accuracy and margin, for a reward model its accuracy and margin, for a classifier its
        accuracy."""
        metrics = metrics or {}
        if "reward_accuracy" in metrics:
            record = {"step": step, "val_loss": val_loss, "val_reward_accuracy": metrics["reward_accuracy"],
                      "val_reward_margin": metrics["reward_margin"]}
            line = (f"val loss {val_loss:.4f}, reward accuracy {100 * metrics['reward_accuracy']:.1f}%, margin "
                    f"{metrics['reward_margin']:.3f}")
        elif "margin" in metrics:  # a reward model
            record = {"step": step, "val_loss": val_loss, "val_accuracy": metrics["accuracy"], "val_margin": metrics["margin"]}
            line = f"val loss {val_loss:.4f}, accuracy {100 * metrics['accuracy']:.1f}%, margin {metrics['margin']:.3f}"
        elif "texts" in metrics:  # a classifier
            record = {"step": step, "val_loss": val_loss, "val_accuracy": metrics["accuracy"]}
            line = f"val loss {val_loss:.4f}, accuracy {100 * metrics['accuracy']:.1f}%"
        else:
            accuracy = metrics.get("accuracy")
            record = {"step": step, "val_loss": val_loss, "val_perplexity": perplexity, "val_accuracy": accuracy}
            line = (f"val loss {val_loss:.4f}, perplexity {perplexity:.2f}"
                    + (f", next-token accuracy {100 * accuracy:.1f}%" if accuracy is not None else ""))
        self.last = {**self.last, **record}
        if self.active:
            self._say(f"step {step}: {line}")
            self._write(record)

    def note(self, step: int, message: str) -> None:
        """An event worth a line: on the terminal and in events.log."""
        if self.active:
            self._say(f"step {step}: {message}")
            self.events.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} step {step}: {message}\n")
            self.events.flush()

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.metrics.close()
            self.events.close()
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _say(self, line: str) -> None:
        self.bar.write(line)  # above the bar, when there is one
        sys.stdout.flush()  # a log file sees it now, not when the buffer fills

    def _write(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.tensorboard.add_scalar(key, value, record["step"])


def read_records(run_dir: str | Path) -> list[dict]:
    """RUN_DIR/metrics.jsonl as records (training steps have "loss", validations "val_loss"), less the
    half-written last line a killed run may leave; [] when there is no such file."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def _continue_records(path: Path, first_step: int):
    """metrics.jsonl opened for writing: emptied for a new run; for a resumed one, cut back to the
    records of steps up to first_step (a killed run may have logged steps its checkpoint lacks)."""
    if not first_step or not path.is_file():
        return open(path, "w")
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= first_step:
                kept.append(line)
        except json.JSONDecodeError:  # the half-written last line of a killed run
            pass
    records = open(path, "w")
    records.writelines(line + "\n" for line in kept)
    return records
