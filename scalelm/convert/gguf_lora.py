"""A LoRA checkpoint as a GGUF LoRA adapter: the file llama.cpp applies to its base's GGUF at run time.

    scalelm convert to-gguf BASE_CKPT base.gguf          # the base the adapters were trained on, any dtype
    to_gguf_lora(LORA_CKPT, adapter.gguf)                 # this module: the adapters alone
    llama-cli -m base.gguf --lora adapter.gguf            # llama_cpp.Llama(model_path=..., lora_path=...)

The file holds no vocabulary and no base weights, only metadata and the two factors of each adapted matrix:

    general.type = "adapter", adapter.type = "lora", general.architecture = the base's (gpt2 or llama)
    adapter.lora.alpha  float32: llama.cpp scales every pair by alpha / r, r read off the pair's shape, so
                        rsLoRA's alpha / sqrt(r) is written as alpha' = alpha sqrt(r)
    <base tensor>.lora_a  (r, in)    e.g. blk.0.attn_q.weight.lora_a; numpy's shape, ggml's ne reversed
    <base tensor>.lora_b  (out, r)   llama.cpp adds alpha / r · B (A x) to the base matrix's output

The factors of each fused scalelm linear are split as for PEFT (convert/peft.py: A shared, B's rows moved
with the base weight's rows), then named and ordered as convert/gguf.py writes the base: GPT-2's attn_qkv
keeps [Q; K; V] rows, and Llama's Q and K rows of B get the same rotate-half -> neighbours permutation as
the base's attn_q and attn_k. Factors are f32 or f16 (q8_0 would need r to be a multiple of 32).

The parity check reads the file back, merges it into the base's GGUF weights as llama.cpp computes it
(W + alpha / r · B A, every name and shape checked as llama.cpp checks them), and runs the merged weights
through transformers against scalelm's forward of the merged model. llama.cpp itself is checked by the
opt-in test `tests/e2e/test_llamacpp.py`.
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from scalelm.config import LoRAConfig, ModelConfig
from scalelm.convert import layouts, parity
from scalelm.convert.gguf import TARGETS, gguf_tensors, hf_state, rope_neighbours
from scalelm.convert.hf import hf_config, write_weights
from scalelm.convert.peft import hf_adapters
from scalelm.convert.source import read_lora
from scalelm.data.files import make_dir
from scalelm.errors import ConversionError
from scalelm.model import lora as lora_math

DTYPES = ("f32", "f16")
_MODULE = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)\.(.+)$")


def to_gguf_lora(source: Path, out: Path, dtype: str = "f32", base: Path | None = None, tokenizer: Path | None = None,
                 verify: bool = True) -> dict:
    """Write the GGUF LoRA adapter of the LoRA checkpoint at `source`, for the GGUF of its base; `base` overrides
    the base path the checkpoint names (its SHA-256 must match)."""
    import gguf

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype}: a GGUF LoRA adapter is written as {' or '.join(DTYPES)}")
    found, adapters, settings = read_lora(source, base, tokenizer, tokenizer_needed=False)  # an adapter holds no vocabulary
    if any(name in lora_math.WHOLE for name in adapters):
        raise ConversionError(f"{source} has a classification head (finetune.head=classification): llama.cpp's LoRA "
                              f"adapters are for language models; export it with `scalelm convert to-hf` or `to-peft`")
    model = found.model
    tensors = gguf_adapter(model, adapters, settings)
    out = Path(out)
    make_dir(out.parent if str(out.parent) else Path("."), "OUT.gguf")
    arch = gguf.MODEL_ARCH.GPT2 if layouts.hf_layout(model) == layouts.GPT2 else gguf.MODEL_ARCH.LLAMA
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, gguf_alpha(settings))
    writer.add_name(f"scalelm LoRA {source} on {found.origin}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    for name, tensor in tensors.items():
        array = tensor.float().numpy()
        writer.add_tensor(name, array if dtype == "f32" else array.astype(np.float16),
                          raw_dtype=gguf.GGMLQuantizationType.F32 if dtype == "f32" else gguf.GGMLQuantizationType.F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = {"source": str(source), "base": found.origin, "architecture": gguf.MODEL_ARCH_NAMES[arch], "dtype": dtype,
              "rank": settings.rank, "alpha": gguf_alpha(settings), "tensors": len(tensors), "bytes": out.stat().st_size}
    if verify:
        report["parity"] = check(model, found.weights, lora_math.merge(found.weights, adapters, settings), out, dtype)
    return report


def gguf_adapter(model: ModelConfig, adapters: dict[str, torch.Tensor], lora: LoRAConfig) -> dict[str, torch.Tensor]:
    """Whole scalelm adapters -> {"<llama.cpp tensor>.lora_a": A (r, in), "<...>.lora_b": B (out, r)}."""
    import gguf

    T, N = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    heads, groups = model.num_heads, model.num_kv_heads or model.num_heads
    # Hugging Face module of a layer -> (llama.cpp's tensor, the heads whose rows are rotate-half -> neighbours)
    places = {"self_attn.q_proj": (T.ATTN_Q, heads), "self_attn.k_proj": (T.ATTN_K, groups),
              "self_attn.v_proj": (T.ATTN_V, None), "self_attn.o_proj": (T.ATTN_OUT, None),
              "mlp.gate_proj": (T.FFN_GATE, None), "mlp.up_proj": (T.FFN_UP, None), "mlp.down_proj": (T.FFN_DOWN, None),
              "attn.c_attn": (T.ATTN_QKV, None), "attn.c_proj": (T.ATTN_OUT, None),
              "mlp.c_fc": (T.FFN_UP, None), "mlp.c_proj": (T.FFN_DOWN, None)}
    out = {}
    for module, (a, b) in hf_adapters(model, adapters, lora).items():
        layer, part = _MODULE.match(module).groups()
        kind, rope_heads = places[part]
        name = f"{N[kind].format(bid=int(layer))}.weight"
        out[name + ".lora_a"] = a
        out[name + ".lora_b"] = rope_neighbours(b, rope_heads) if rope_heads else b
    return {name: t.contiguous() for name, t in out.items()}


def gguf_alpha(lora: LoRAConfig) -> float:
    """adapter.lora.alpha such that llama.cpp's alpha / r is scalelm's scale (rsLoRA: alpha / sqrt r)."""
    return lora.alpha * math.sqrt(lora.rank) if lora.rslora else float(lora.alpha)


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], float]:
    """(every tensor as fp32, (out, in) orientation; adapter.lora.alpha) of a GGUF LoRA adapter, or a
    ConversionError saying why llama.cpp would refuse it."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ConversionError(f"{path}: cannot read it as GGUF ({e})") from None

    def value(key: str):
        field = reader.fields.get(key)
        if field is None:
            raise ConversionError(f"{path}: no {key}, so llama.cpp would not load it as a LoRA adapter")
        part = field.parts[field.data[0]]
        return bytes(part).decode("utf-8") if field.types[0] == gguf.GGUFValueType.STRING else part[0].item()

    if (value(gguf.Keys.General.TYPE), value(gguf.Keys.Adapter.TYPE)) != ("adapter", "lora"):
        raise ConversionError(f"{path}: general.type and adapter.type are not 'adapter' and 'lora'")
    tensors = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
               for t in reader.tensors}
    return tensors, float(value(gguf.Keys.Adapter.LORA_ALPHA))


def merge_adapter(weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """llama.cpp's weights (gguf_tensors) with an adapter's pairs merged in as llama.cpp applies them:
    W + alpha / r · B A, r = the columns of B (ggml's ne[0]); the checks llama.cpp makes on loading are ConversionErrors here."""
    merged = dict(weights)
    for name in tensors:
        weight, _, kind = name.rpartition(".")
        if kind not in ("lora_a", "lora_b"):
            raise ConversionError(f"adapter tensor {name} is neither a lora_a nor a lora_b")
        if weight + ".lora_a" not in tensors or weight + ".lora_b" not in tensors:
            raise ConversionError(f"adapter tensor {name} has no {'lora_b' if kind == 'lora_a' else 'lora_a'} beside it")
        if kind == "lora_b":
            continue
        a, b = tensors[weight + ".lora_a"], tensors[weight + ".lora_b"]
        if weight not in weights:
            raise ConversionError(f"adapter tensor {name}: the base has no {weight}")
        w = weights[weight]
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
            raise ConversionError(f"adapter tensors {weight}.lora_a/b have shapes {list(a.shape)}/{list(b.shape)}, "
                                  f"which do not fit {weight} {list(w.shape)}")
        merged[weight] = w + (alpha / b.shape[1] * (b.double() @ a.double())).float()
    return merged


def check(model: ModelConfig, base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], out: Path, dtype: str) -> dict:
    """The adapter at `out` read back and merged into `base`'s GGUF weights as llama.cpp does, through
    transformers, against scalelm's forward of the `merged` weights."""
    tensors, alpha = read_adapter(out)
    weights = merge_adapter(gguf_tensors(model, layouts.to_hf(model, base)), tensors, alpha)
    with tempfile.TemporaryDirectory(prefix="scalelm-gguf-lora-") as tmp:
        hf_config(model).save_pretrained(tmp)
        write_weights(Path(tmp), hf_state(model, weights))
        return parity.check(model, merged, tmp, TARGETS[dtype], f"the base with the {dtype} GGUF adapter merged as llama.cpp does")
