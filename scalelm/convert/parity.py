"""Is the converted model the same model? Logits of scalelm's own forward against the converted one's
on a fixed batch of token ids; the conversion reports the largest difference and fails past a target.
"""

from __future__ import annotations

import torch

from scalelm.config import ModelConfig, ParallelConfig
from scalelm.errors import ConversionError

PROMPTS, PROMPT_LEN = 2, 32


def probe_tokens(vocab_size: int, context: int) -> torch.Tensor:
    """(PROMPTS, up to PROMPT_LEN) token ids, the same every time, drawn from the whole vocabulary."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (PROMPTS, min(PROMPT_LEN, context)), generator=generator)


@torch.no_grad()
def scalelm_logits(model: ModelConfig, weights: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """scalelm's forward (megatron-core layers, one process) on `tokens` (b, s): logits (b, s, V), fp32; for a
    classification head, the scores at the last token (b, num_labels)."""
    from scalelm.convert.layouts import score_labels
    from scalelm.model.gpt import GPT
    from scalelm.model.spec import layer_spec, transformer_config
    from scalelm.parallel.topology import single_process

    tc = transformer_config(model, ParallelConfig(), on_gpu=False)
    tc.perform_initialization = False  # every weight is loaded next: drawing random ones first would take minutes at 7B
    with single_process():
        gpt = GPT(model, tc, layer_spec(on_gpu=False), model.vocab_size, seed=0, num_labels=score_labels(weights))
        missing, unexpected = gpt.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ConversionError(f"the weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        logits = gpt.eval()(tokens)  # (s, b, V_pad), or (s, b, num_labels)
    if score_labels(weights):
        return logits[-1].float()
    return logits.transpose(0, 1)[..., : model.vocab_size].float()


@torch.no_grad()
def hf_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    return hf_model.eval()(input_ids=tokens).logits.float()


def check(model: ModelConfig, weights: dict[str, torch.Tensor], folder, target: float | None, what: str | None = None) -> dict:
    """Load the Hugging Face folder `folder` in fp32 and compare its logits with scalelm's forward of `weights`
    on the probe batch (a classification head's scores at the last token); the report, or a ConversionError past
    `target`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from scalelm.convert.layouts import score_labels

    auto = AutoModelForSequenceClassification if score_labels(weights) else AutoModelForCausalLM
    hf = auto.from_pretrained(folder, dtype=torch.float32)
    return check_loaded(model, weights, hf, target, what or f"{type(hf).__name__} (fp32)")


def check_loaded(model: ModelConfig, weights: dict[str, torch.Tensor], hf, target: float | None, what: str) -> dict:
    """`check` of a loaded transformers (or PEFT) model."""
    from scalelm.convert.layouts import score_labels

    tokens = probe_tokens(model.vocab_size, model.max_position_embeddings)
    pad = hf.config.pad_token_id
    if score_labels(weights) and pad is not None:  # Hugging Face reads the last token that is not padding
        tokens = torch.where(tokens == pad, (pad + 1) % model.vocab_size, tokens)
    if score_labels(weights) and pad is None:  # without a pad id, Hugging Face scores one sequence at a time
        theirs = torch.cat([hf_logits(hf, row[None]) for row in tokens])
    else:
        theirs = hf_logits(hf, tokens)
    return compare(scalelm_logits(model, weights, tokens), theirs, target, what)


def compare(ours: torch.Tensor, theirs: torch.Tensor, target: float | None, what: str) -> dict:
    """{"max_abs_diff", "target", "what"}; raises ConversionError past the target."""
    if ours.shape != theirs.shape:
        raise ConversionError(f"{what}: logits of shape {list(theirs.shape)}, scalelm's are {list(ours.shape)}")
    diff = (ours - theirs).abs().max().item()
    report = {"max_abs_diff": diff, "target": target, "what": what}
    if target is not None and not diff <= target:  # NaN fails too
        raise ConversionError(f"parity check failed: {what} differs from scalelm's forward by max |Δlogit| = {diff:.3g} "
                              f"> {target:g}; the export is kept for inspection")
    return report


def describe(report: dict) -> str:
    target = f" (target ≤ {report['target']:g})" if report["target"] is not None else ""
    return f"parity: max |Δlogit| = {report['max_abs_diff']:.2e} between scalelm and {report['what']}{target}"
