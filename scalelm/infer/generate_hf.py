"""`scalelm generate MODEL --prompt TEXT` on a Hugging Face folder, or with `--backend hf`: sample text with
transformers from a Hugging Face export or a scalelm checkpoint (converted on the fly), streaming tokens to the
terminal. (A checkpoint is otherwise sampled on scalelm's own decoder: generate.py.)

Sampling, the KV cache and stopping at EOS are transformers' `generate`; scalelm picks the settings,
wraps a --chat prompt in the tokenizer's chat template, and makes a seed give the same text every time.
"""

from __future__ import annotations

import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from scalelm.errors import ConfigError, ConversionError
from scalelm.generation.sampling import Sampling


def generate(model_path: Path, prompt: str, sampling: Sampling, chat: bool = False, system: str | None = None,
             stream: bool = True, base: Path | None = None) -> str:
    """The text generated after `prompt` (printed as it comes when `stream`); `base`: a LoRA checkpoint's base,
    where it is not at the path the checkpoint names."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, set_seed

    with hf_folder(model_path, base) as folder:
        if any(a.endswith("ForSequenceClassification") for a in json.loads((folder / "config.json").read_text())["architectures"]):
            raise ConversionError(f"{model_path} is a classification model (finetune.head=classification): it scores "
                                  f"text and generates none")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if chat:
        if not tokenizer.chat_template:
            raise ConversionError(f"{model_path} has no chat template (its tokenizer lacks the chat markers): drop --chat")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    context = model.config.max_position_embeddings
    if ids.shape[1] >= context:
        raise ConfigError(f"the prompt is {ids.shape[1]} tokens and the model's context is {context}: shorten it")
    new_tokens = min(sampling.max_new_tokens, context - ids.shape[1])
    if new_tokens < sampling.max_new_tokens:
        print(f"scalelm: --max-new-tokens cut to {new_tokens}: the model's context is {context} tokens", file=sys.stderr)
    set_seed(sampling.seed)
    greedy = sampling.temperature == 0
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=not greedy,
                             temperature=None if greedy else sampling.temperature,
                             top_k=None if greedy else sampling.top_k, top_p=None if greedy else sampling.top_p,
                             min_p=None if greedy or not sampling.min_p else sampling.min_p,
                             repetition_penalty=sampling.repetition_penalty, streamer=streamer)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@contextmanager
def hf_folder(path: Path, base: Path | None = None) -> Iterator[Path]:
    """A Hugging Face folder: `path` itself, or a scalelm checkpoint converted into a temporary one (a LoRA
    checkpoint merged into its base)."""
    path = Path(path)
    if (path / "config.json").is_file():
        yield path
        return
    from scalelm.convert.hf import to_hf

    with tempfile.TemporaryDirectory(prefix="scalelm-hf-") as tmp:
        to_hf(path, Path(tmp), verify=False, base=base)
        if not (Path(tmp) / "tokenizer.model").is_file():
            raise ConversionError(f"{path} names no tokenizer to generate with: convert it with --tokenizer first")
        yield Path(tmp)
