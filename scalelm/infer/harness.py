"""lm-evaluation-harness on scalelm's engine: an `lm_eval` model whose requests run on the training layout.

    loglikelihood          (context, continuation) -> (Σ log p of the continuation's tokens, whether greedy decoding
                           gives them): each request one row, BOS + context + continuation cut to the model's context
                           from the left, the rows longest first in micro-batches split over data-parallel ranks
                           (parallel/shares.py), the logits of one micro-batch at a time
    loglikelihood_rolling  a text's Σ log p over windows of the model's context, as lm-eval cuts them
    generate_until         greedy or sampled continuations by scalelm's decoder (generation/rollouts.py), cut at the
                           task's stop strings

Tokens are the SentencePiece model's, with BOS first as scalelm trains (lm-eval's `hf` backend gives the same with
`add_bos_token=True` on the exported folder). Every rank answers every request (the results are gathered), so lm-eval
may run on each and rank 0 write.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from scalelm.generation.rollouts import generate
from scalelm.generation.sampling import Sampling
from scalelm.objectives import Output
from scalelm.objectives.tokens import token_hits, token_logps
from scalelm.parallel.shares import over_data_parallel


class ScalelmLM(TemplateLM):
    """`engine` (parallel/engine.py, no optimizer needed) scoring and generating for lm-eval; `sp` its SentencePiece
    tokenizer; `context` the model's longest sequence; `batch_size` rows per micro-batch."""

    def __init__(self, engine, sp, context: int, batch_size: int = 8, eos: set[int] | None = None):
        super().__init__()
        self.engine, self.sp, self.context, self.batch_size = engine, sp, context, batch_size
        self.eos = eos if eos is not None else {sp.eos_id()}

    # ------------------------------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.sp.eos_id()

    @property
    def prefix_token_id(self) -> int:
        return self.sp.bos_id()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return ([self.sp.bos_id()] if add_special_tokens is not False else []) + self.sp.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.sp.decode(tokens)

    # ------------------------------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = [(context + continuation)[-(self.context + 1):] for _, context, continuation in requests]
        targets = [len(continuation) for _, _, continuation in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # like lengths share a micro-batch
        width = self.context if self.engine.pipeline else None  # a pipeline fixes its activations' shape

        def batch_of(chosen: list[int]) -> dict:
            length = width or max(len(rows[i]) for i in chosen) - 1
            ids, labels = torch.zeros(len(chosen), length, dtype=torch.long), torch.zeros(len(chosen), length, dtype=torch.long)
            for k, i in enumerate(chosen):
                ids[k, :len(rows[i]) - 1] = torch.tensor(rows[i][:-1])
                labels[k, :len(rows[i]) - 1] = torch.tensor(rows[i][1:])
            return {"input_ids": ids, "labels": labels}

        done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per micro-batch, its (log-probs, hits), (b, s) each

        def scored(batch: dict, logits: torch.Tensor, k: int, i: int) -> tuple[float, bool]:
            if id(batch) not in done:  # once a micro-batch: the log-probs consume its fp32 logits
                labels = batch["labels"].to(logits.device)
                hits = token_hits(logits, labels).t()
                done.clear()
                done[id(batch)] = (token_logps(logits, labels), hits)
            logps, hits = done[id(batch)][0][k], done[id(batch)][1][k]
            end = len(rows[i]) - 1
            span = slice(end - min(targets[i], end), end)
            return float(logps[span].double().sum()), bool(hits[span].all())

        return over_data_parallel(self.engine, len(rows), self.batch_size, batch_of, Output.LOGITS, scored,
                                  per_call=1, order=order)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        pieces, owners = [], []
        for r, request in enumerate(requests):
            (text,) = request.args
            # the text's own BOS is its first target after the prefix BOS, as lm-eval's hf backend scores a text with
            # a tokenizer that adds BOS (Llama's, and scalelm's export): the same numbers
            windows = get_rolling_token_windows(token_list=self.tok_encode(text),
                                                prefix_token=self.prefix_token_id, max_seq_len=self.context,
                                                context_len=1)
            for window in map(make_disjoint_window, windows):
                pieces.append((None, *window))
                owners.append(r)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(pieces)):
            totals[owner] += logp
        return totals

    # ------------------------------------------------------------------------------------------ generating

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:  # each its own settings; the decoder batches a request's samples
            context, settings = request.args
            out.append(self._generate_one(context, dict(settings)))
        return out

    def _generate_one(self, context: str, settings: dict[str, Any]) -> str:
        until = settings.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        sampling = Sampling(max_new_tokens=int(settings.pop("max_gen_toks", 256)),
                            temperature=float(settings.pop("temperature", 0.0)) if settings.pop("do_sample", False) else 0.0,
                            stop=tuple(until))
        ids = self.tok_encode(context)[-(self.context - 1):]
        rollouts = generate(self.engine, [ids], sampling, self.eos, self.context,
                            stopped=lambda tokens: any(s in self.sp.decode(tokens) for s in until) if until else False)
        text = self.sp.decode([t for t in rollouts.completion(0) if t not in self.eos])
        cuts = [text.find(s) for s in until if s in text]
        return text[:min(cuts)] if cuts else text
