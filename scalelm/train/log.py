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
from scalelm.objectives import Objective
from scalelm.train.records import StepRecord, loss_text


class RunLog:
    def __init__(self, cfg: Config, objective: Objective, active: bool, total_steps: int, first_step: int = 0,
                 stage: str = "pretrain"):
        self.active, self.every, self.objective = active, cfg.log.every, objective
        self.last: dict = {}  # the newest record, a step's with its validation's
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

    def step(self, step: StepRecord) -> None:
        """After each optimizer step."""
        record = step.as_json()
        self.last = record
        if not self.active:
            return
        summary = (f"loss {loss_text(step.loss)} lr {step.lr:.2e} {step.tokens_per_s:,.0f} tok/s"
                   + self.objective.progress(step.metrics)
                   + (f" MFU {100 * step.mfu:.1f}% (PaLM)" if step.mfu is not None else ""))
        self.bar.update(1)
        self.bar.set_postfix_str(summary, refresh=False)
        if step.step % self.every == 0 or step.step == self.bar.total:
            self._write(record)
            if self.lines:
                self._say(f"step {step.step}/{self.bar.total}: {summary}")

    def eval(self, step: int, loss: float, metrics: dict[str, float]) -> None:
        """After a validation: its loss and what the objective makes of it (perplexity and next-token accuracy,
        DPO's reward accuracy and margin, a classifier's accuracy, ...)."""
        if not self.active:  # only rank 0's figures are whole (a pipeline's middle stages have no metrics)
            return
        figures, line = self.objective.validation(loss, metrics)
        record = {"step": step, **figures}
        self.last = {**self.last, **record}
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
