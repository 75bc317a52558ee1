"""A reward model scoring completions on the run's own ranks (rl.reward_model): a checkpoint of scalelm's reward head
(finetune.objective=reward), held by a second engine in the run's layout, forward only.

Each completion is scored as the reward head was trained to score a reply: its prompt and the completion, and after
an end of turn the newline the chat template closes a turn with (data/chat.py; where it fits the reward model's
context), its score the head's output at the last token. The data-parallel ranks split the completions
(parallel/shares.py); the scores are gathered on every rank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scalelm.checkpoint import store
from scalelm.config import Config, load_config, to_dict
from scalelm.errors import CheckpointError, ConfigError
from scalelm.objectives import Output, registry
from scalelm.parallel.shares import over_data_parallel


def check(cfg: Config, tokenizer_sha256: str | None) -> tuple[Path, dict]:
    """(checkpoint, manifest) of rl.reward_model, once it is a reward head of this tokenizer; ConfigError otherwise."""
    field = f"rl.reward_model={cfg.rl.reward_model}"
    try:
        ckpt = store.resolve(Path(cfg.rl.reward_model))
        manifest = store.read_manifest(ckpt)
    except CheckpointError as e:
        raise ConfigError(f"{field}: {e}") from None
    trained = manifest.get("objective") or manifest["config"].get("finetune", {}).get("objective")
    if trained != "reward":
        raise ConfigError(f"{field} was trained with finetune.objective={trained}: a reward model is a reward head "
                          f"(finetune.objective=reward, `scalelm finetune` on preference pairs)")
    if not manifest["config"]["model"].get("causal", True):
        raise ConfigError(f"{field} is a bidirectional model (model.causal=false): scoring rows of different lengths, "
                          f"padded, it would read the padding; use a causal reward model")
    if tokenizer_sha256 and manifest.get("tokenizer_sha256") not in (None, tokenizer_sha256):
        raise ConfigError(f"{field} was trained with another tokenizer than data.tokenizer: it would read the "
                          f"completions' token ids as other text")
    return ckpt, manifest


class RewardModel:
    """The reward head of rl.reward_model on this rank's layout; `score` is collective."""

    def __init__(self, cfg: Config, layout, tokenizer_sha256: str | None, newline: list[int], end_of_turn: int):
        from scalelm.checkpoint.resume import init_weights
        from scalelm.model.build import build_model
        from scalelm.parallel.engine import Engine

        ckpt, manifest = check(cfg, tokenizer_sha256)
        saved = manifest["config"]
        run = to_dict(cfg)
        mine = {"model": saved["model"], "finetune": {**saved["finetune"], "lora": saved["finetune"].get("lora")},
                "parallel": {**run["parallel"], "sequence_parallel": False}, "data": run["data"],
                "train": {**run["train"], "init_from": str(ckpt), "objective": "next_token"}}
        self.cfg = load_config(None, [], base=mine)
        objective = registry.lookup("reward", "rl.reward_model")(self.cfg)
        model = build_model(self.cfg, layout, self.cfg.model.vocab_size, False, objective.num_labels())
        self.engine = Engine(self.cfg, layout, model, objective)
        init_weights(self.cfg, self.engine, tokenizer_sha256, flag="rl.reward_model's base")
        self.layout, self.micro = layout, cfg.train.micro_batch_size
        self.newline, self.end_of_turn = newline, end_of_turn
        context = self.cfg.model.max_position_embeddings
        if cfg.train.seq_len > context:
            raise ConfigError(f"rl.reward_model reads {context} tokens at most, and a completion may fill train.seq_len="
                              f"{cfg.train.seq_len}: lower train.seq_len")
        self.width = min(cfg.train.seq_len + len(newline), context)

    @torch.no_grad()
    def score(self, rows: list[list[int]]) -> list[float]:
        """The head's score of each row (prompt + completion), on every rank. Collective."""
        rows = [r + self.newline if r[-1] == self.end_of_turn and len(r) + len(self.newline) <= self.width else r
                for r in rows]

        def batch_of(chosen):
            ids = torch.zeros(len(chosen), self.width, dtype=torch.long)
            for k, i in enumerate(chosen):
                ids[k, :len(rows[i])] = torch.tensor(rows[i])
            return {"input_ids": ids}

        return over_data_parallel(self.engine, len(rows), self.micro, batch_of, Output.SCORES,
                                  lambda batch, scores, k, i: float(scores[len(rows[i]) - 1, k, 0]))
