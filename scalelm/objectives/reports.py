"""What `scalelm eval` prints: an objective's figures over a split, as one paragraph of plain words.

    Perplexity       a language model on text or chat shards (next_token, sft); transformers' too
    Preferences      a policy on preference pairs against its reference (dpo), its own likelihoods, a reward model's
    Classification   a classifier on labelled texts: accuracy, macro-F1 and the confusion matrix
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Perplexity:
    loss: float
    windows: int
    seq_len: int
    engine: str
    targets: int | None = None  # the target tokens the loss is the mean over (None: every token of the windows)
    accuracy: float | None = None  # the share of targets whose most likely next token is the right one

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def line(self, split: str) -> str:
        tokens = f"{self.windows * self.seq_len:,} tokens" if self.targets is None else f"{self.targets:,} target tokens"
        accuracy = f", next-token accuracy {100 * self.accuracy:.2f}%" if self.accuracy is not None else ""
        return (f"perplexity {self.perplexity:.4f} (loss {self.loss:.6f}{accuracy}) over {self.windows} {split} windows of "
                f"{self.seq_len} tokens ({tokens}; {self.engine})")


@dataclass
class Preferences:
    """Figures on preference pairs, each a mean over the pairs; `figures`: "rewards" (a policy's against its
    reference), "likelihoods" (a model not trained with DPO: its own log-probs alone) or "scores" (a reward model's)."""

    loss: float
    pairs: int
    windows: int
    engine: str
    metrics: dict
    figures: str = "rewards"

    @classmethod
    def of(cls, outcome, context, figures: str) -> "Preferences | None":
        """The figures of an evaluation's outcome (parallel/engine.py: Outcome), on the rank that reports."""
        return cls(outcome.loss, outcome.units, context.windows, context.engine, outcome.metrics, figures) \
            if context.rank0 else None

    def line(self, split: str) -> str:
        m, where = self.metrics, f"over {self.pairs:,} {split} pairs in {self.windows} windows ({self.engine})"
        if self.figures == "scores":
            return (f"accuracy {100 * m['accuracy']:.2f}%, margin {m['margin']:.4f} (chosen {m['score_chosen']:.4f}, "
                    f"rejected {m['score_rejected']:.4f}; Bradley-Terry loss {self.loss:.6f}) {where}")
        likelier = (f"the chosen reply the likelier in {100 * m['chosen_likelier']:.2f}% (log-probs chosen "
                    f"{m['logps_chosen']:.3f}, rejected {m['logps_rejected']:.3f})")
        if self.figures == "likelihoods":
            return f"{likelier} {where}; no reference: a model not trained with DPO"
        return (f"reward accuracy {100 * m['reward_accuracy']:.2f}%, margin {m['reward_margin']:.4f} (chosen "
                f"{m['reward_chosen']:.4f}, rejected {m['reward_rejected']:.4f}; DPO loss {self.loss:.6f}); {likelier} "
                f"{where}")


@dataclass
class Classification:
    """A classifier's figures on labelled texts: the confusion matrix (rows the class, columns the prediction)."""

    names: list[str]
    confusion: list[list[int]]
    windows: int
    engine: str

    @property
    def texts(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def accuracy(self) -> float:
        return sum(self.confusion[i][i] for i in range(len(self.names))) / max(self.texts, 1)

    @property
    def macro_f1(self) -> float:
        """The mean over classes of 2 TP / (2 TP + FP + FN); a class absent from both rows and columns counts 0."""
        k = len(self.names)
        scores = []
        for i in range(k):
            tp, row, column = self.confusion[i][i], sum(self.confusion[i]), sum(r[i] for r in self.confusion)
            scores.append(2 * tp / (row + column) if row + column else 0.0)
        return sum(scores) / k

    def line(self, split: str) -> str:
        width = max(len(n) for n in self.names)
        rows = [f"  {name:>{width}}  " + " ".join(f"{n:6d}" for n in row) for name, row in zip(self.names, self.confusion)]
        return (f"accuracy {100 * self.accuracy:.2f}%, macro-F1 {self.macro_f1:.4f} over {self.texts:,} {split} texts in "
                f"{self.windows} windows ({self.engine})\nconfusion (rows: class, columns: predicted "
                f"{', '.join(self.names)}):\n" + "\n".join(rows))
