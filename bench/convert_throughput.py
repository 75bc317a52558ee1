"""Conversion and inference figures for a GPT-3-style model (default the 125M preset), one process, CPU:
`to-hf`, `from-hf` and `to-gguf` wall time (with and without the parity check), file sizes, the
largest |Δlogit| each reports, and generation tokens/s through transformers next to a plain
greedy loop without a KV cache.

    python bench/convert_throughput.py [--config configs/gpt3-125m.yaml] [--arch gpt|llama] [--dir DIR] [key=value ...]

The weights are the preset's initialisation (scalelm's own, seeded) with a little noise so that
logits are not uniform; the vocabulary is GPT-2's 50,257 (padded to 50,304). Prints figures only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from scalelm.checkpoint import store
from scalelm.config import load_config, to_dict
from scalelm.convert.gguf import to_gguf
from scalelm.convert.hf import from_hf, to_hf
from scalelm.convert.parity import describe
from scalelm.convert.source import CONSOLIDATED
from scalelm.model.gpt import GPT
from scalelm.model.spec import layer_spec, transformer_config
from scalelm.parallel.topology import single_process

VOCAB = 50257
LLAMA = ["model.position_embedding=rope", "model.normalization=rmsnorm", "model.activation=swiglu", "model.bias=false",
         "model.tie_embeddings=false"]


def consolidated(cfg, path: Path) -> int:
    """A consolidated weight file of the config's model, as `scalelm checkpoint consolidate` writes it."""
    with single_process():
        model = GPT(cfg.model, transformer_config(cfg.model, cfg.parallel, on_gpu=False), layer_spec(False), VOCAB, 0)
        weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    for name, w in weights.items():
        if w.dim() == 1:
            w.add_(torch.randn(w.shape, generator=g) * 0.1)
    meta = {"format": CONSOLIDATED, "model": json.dumps(to_dict(cfg)["model"]), "step": "0",
            "vocab_size": str(VOCAB), "tokenizer_sha256": "", "tokenizer": ""}
    store.write_tensors(path, weights, meta)
    return sum(w.numel() for w in weights.values())


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


@torch.no_grad()
def generation(folder: Path, new_tokens: int) -> tuple[float, float]:
    """tokens/s of transformers' generate (greedy, KV cache) and of a greedy loop that recomputes the prefix."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    _, cached = timed(model.generate, prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def plain():
        ids = prompt
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)

    _, uncached = timed(plain)
    return new_tokens / cached, new_tokens / uncached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/gpt3-125m.yaml")
    parser.add_argument("--arch", choices=["gpt", "llama"], default="gpt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cfg = load_config(args.config, [f"model.vocab_size={VOCAB}", *(LLAMA if args.arch == "llama" else []), *args.overrides])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        source = root / "model.safetensors"
        params, seconds = timed(consolidated, cfg, source)
        size = source.stat().st_size
        print(f"{args.config} ({args.arch}): {params / 1e6:,.1f}M parameters, {size / 1e6:,.0f} MB fp32 "
              f"(consolidated file written in {seconds:.1f} s), torch threads {torch.get_num_threads()}")
        _, bare = timed(to_hf, source, root / "hf-bare", verify=False)
        report, checked = timed(to_hf, source, root / "hf")
        print(f"to-hf:   {bare:6.1f} s ({size / 1e6 / bare:,.0f} MB/s), {checked:6.1f} s with the parity check; "
              f"{describe(report['parity'])}")
        report, back = timed(from_hf, root / "hf", root / "back")
        print(f"from-hf: {back:6.1f} s with the parity check; {describe(report['parity'])}")
        for dtype in ("f16", "q8_0"):
            out = root / f"model-{dtype}.gguf"
            _, bare = timed(_gguf_without_tokenizer, source, out, dtype, verify=False)
            report, checked = timed(_gguf_without_tokenizer, source, out, dtype)
            print(f"to-gguf {dtype}: {bare:6.1f} s, {checked:6.1f} s with the parity check, {out.stat().st_size / 1e6:,.0f} MB; "
                  f"{describe(report['parity'])}")
        cached, uncached = generation(root / "hf", args.new_tokens)
        print(f"generate ({args.new_tokens} new tokens, greedy, batch 1): {cached:,.1f} tokens/s with transformers' KV cache, "
              f"{uncached:,.1f} tokens/s recomputing the prefix")


def _gguf_without_tokenizer(source: Path, out: Path, dtype: str, verify: bool = True) -> dict:
    """to_gguf needs a tokenizer of the model's vocabulary; the bench has none, so it writes a stand-in."""
    return to_gguf(source, out, dtype, tokenizer=_stand_in_tokenizer(out.parent), verify=verify)


def _stand_in_tokenizer(root: Path) -> Path:
    path = root / "stand-in.model"
    if not path.is_file():
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
        proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = 0, 1, 2, 3
        for i in range(VOCAB):
            piece = proto.pieces.add()
            piece.piece, piece.score = ["<unk>", "<s>", "</s>", "<pad>"][i] if i < 4 else f"p{i}", -float(i)
            piece.type = [2, 3, 3, 3][i] if i < 4 else 1
        path.write_bytes(proto.SerializeToString())
    return path


if __name__ == "__main__":
    sys.exit(main())
