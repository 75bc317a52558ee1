"""`scalelm convert to-gguf CKPT OUT.gguf --dtype f32|f16|q8_0`: one GGUF file, tokenizer inside, for llama.cpp.

The GPT-2 layout becomes llama.cpp's `gpt2` architecture and the Llama layout its `llama`
architecture, with the tensor names the `gguf` package defines for them. Matrices are stored in
the chosen dtype (q8_0 needs rows of a multiple of 32 values; others fall back to f16), while norms
and biases stay f32, as llama.cpp's own converter does. The SentencePiece model goes in whole: its
pieces, scores and piece types, the special ids and the chat template.

RoPE: Hugging Face's Llama rotates the two halves of each head (dimension i with i + d/2), llama.cpp's
`llama` rotates neighbours (2i with 2i + 1); the rows of Q and K are permuted so the two agree.

The parity check reads the file back with the `gguf` package, dequantizes it, and runs those
weights through transformers: it checks what the file holds, in the precision it holds it. llama.cpp
itself is checked by the opt-in test `tests/e2e/test_llamacpp.py`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from scalelm.config import ModelConfig
from scalelm.convert import layouts, parity
from scalelm.convert.hf import hf_config, write_weights
from scalelm.convert.source import read_model
from scalelm.convert.vocab import CHAT_TEMPLATE, add_dummy_prefix, gguf_vocab, specials
from scalelm.data.files import make_dir
from scalelm.errors import ConversionError

DTYPES = ("f32", "f16", "q8_0")
TARGETS = {"f32": 1e-4, "f16": 1e-2, "q8_0": 0.5}  # max |Δlogit|; q8_0 bounded loosely: it catches a misplaced tensor, not rounding


def to_gguf(source: Path, out: Path, dtype: str = "f16", tokenizer: Path | None = None, verify: bool = True,
            base: Path | None = None) -> dict:
    """Write the GGUF file of the scalelm model at `source` (checkpoint or consolidated file; a LoRA checkpoint
    merged into its base, found at `base` or where the checkpoint names it)."""
    import gguf

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype}: GGUF export writes {', '.join(DTYPES)}")
    found = read_model(source, tokenizer, base=base)
    if layouts.score_labels(found.weights):
        raise ConversionError(f"{found.origin} has a classification head (finetune.head=classification), not a language "
                              f"model's: GGUF holds causal LMs; export it with `scalelm convert to-hf`")
    if found.tokenizer is None:
        raise ConversionError(f"{found.origin} names no tokenizer, and a GGUF file carries one: pass --tokenizer PATH")
    model = found.model
    layout = layouts.hf_layout(model)
    tokens, scores, types = gguf_vocab(found.tokenizer)
    if len(tokens) != model.vocab_size:
        raise ConversionError(f"the tokenizer has {len(tokens)} pieces but the model {model.vocab_size}: pass the "
                              f"tokenizer it was trained with (--tokenizer)")
    make_dir(out.parent if str(out.parent) else Path("."), "OUT.gguf")
    arch = gguf.MODEL_ARCH.GPT2 if layout == layouts.GPT2 else gguf.MODEL_ARCH.LLAMA
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    _write_header(writer, model, dtype, found.origin)
    ids = specials(found.tokenizer)
    writer.add_tokenizer_model("llama")  # llama.cpp's name for a SentencePiece vocabulary
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for name, value in (("bos", ids.bos), ("eos", ids.eos), ("unk", ids.unk), ("pad", ids.pad), ("eot", ids.end_of_turn)):
        if value >= 0:
            getattr(writer, f"add_{name}_token_id")(value)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(add_dummy_prefix(found.tokenizer))  # else llama.cpp puts "▁" before every text
    if ids.end_of_turn >= 0:
        writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in gguf_tensors(model, layouts.to_hf(model, found.weights)).items():
        array, qtype = _encode(tensor, dtype)
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = {"source": found.origin, "architecture": gguf.MODEL_ARCH_NAMES[arch], "dtype": dtype, "bytes": out.stat().st_size}
    if verify:
        tensors, tokens_back = read_gguf(out)
        if tokens_back != [t.decode("utf-8") for t in tokens]:
            raise ConversionError(f"{out}: the vocabulary read back differs from the tokenizer's")
        with tempfile.TemporaryDirectory(prefix="scalelm-gguf-") as tmp:  # the weights read back, as transformers loads them
            hf_config(model).save_pretrained(tmp)
            write_weights(Path(tmp), hf_state(model, tensors))
            report["parity"] = parity.check(model, found.weights, tmp, TARGETS[dtype], f"the {dtype} GGUF weights")
    return report


def gguf_tensors(model: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face layout -> llama.cpp's tensor names and orientation (Linear's (out, in) everywhere)."""
    import gguf

    T, N = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    heads, groups = model.num_heads, model.num_kv_heads or model.num_heads
    out: dict[str, torch.Tensor] = {}

    def put(kind, tensor: torch.Tensor, block: int | None = None, suffix: str = "weight") -> None:
        out[f"{N[kind].format(bid=block)}.{suffix}"] = tensor

    if layouts.hf_layout(model) == layouts.GPT2:
        put(T.TOKEN_EMBD, state["transformer.wte.weight"])
        put(T.POS_EMBD, state["transformer.wpe.weight"])
        for i in range(model.num_layers):
            h = f"transformer.h.{i}."
            for kind, name, transpose in ((T.ATTN_NORM, "ln_1", False), (T.ATTN_QKV, "attn.c_attn", True),
                                          (T.ATTN_OUT, "attn.c_proj", True), (T.FFN_NORM, "ln_2", False),
                                          (T.FFN_UP, "mlp.c_fc", True), (T.FFN_DOWN, "mlp.c_proj", True)):
                weight = state[h + name + ".weight"]
                put(kind, weight.t() if transpose else weight, i)
                put(kind, state[h + name + ".bias"], i, "bias")
        put(T.OUTPUT_NORM, state["transformer.ln_f.weight"])
        put(T.OUTPUT_NORM, state["transformer.ln_f.bias"], suffix="bias")
        # llama.cpp's gpt2 reads its output matrix from `output`, tied or not
        put(T.OUTPUT, state.get("lm_head.weight", state["transformer.wte.weight"]))
        return out
    put(T.TOKEN_EMBD, state["model.embed_tokens.weight"])
    for i in range(model.num_layers):
        h = f"model.layers.{i}."
        put(T.ATTN_NORM, state[h + "input_layernorm.weight"], i)
        put(T.FFN_NORM, state[h + "post_attention_layernorm.weight"], i)
        for kind, name, rope_heads in ((T.ATTN_Q, "self_attn.q_proj", heads), (T.ATTN_K, "self_attn.k_proj", groups),
                                       (T.ATTN_V, "self_attn.v_proj", None), (T.ATTN_OUT, "self_attn.o_proj", None),
                                       (T.FFN_GATE, "mlp.gate_proj", None), (T.FFN_UP, "mlp.up_proj", None),
                                       (T.FFN_DOWN, "mlp.down_proj", None)):
            for suffix in ("weight", "bias"):
                if h + name + "." + suffix in state:
                    tensor = state[h + name + "." + suffix]
                    put(kind, rope_neighbours(tensor, rope_heads) if rope_heads else tensor, i, suffix)
    put(T.OUTPUT_NORM, state["model.norm.weight"])
    if "lm_head.weight" in state:  # tied: llama.cpp reuses token_embd
        put(T.OUTPUT, state["lm_head.weight"])
    return out


def hf_state(model: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `gguf_tensors`: llama.cpp's names back to the Hugging Face layout."""
    import gguf

    heads, groups = model.num_heads, model.num_kv_heads or model.num_heads
    names = {}  # gguf name -> (hf name, transpose, rope heads)
    T, N = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    gpt2 = layouts.hf_layout(model) == layouts.GPT2
    if gpt2:
        names |= {N[T.TOKEN_EMBD]: ("transformer.wte", False, None), N[T.POS_EMBD]: ("transformer.wpe", False, None),
                  N[T.OUTPUT_NORM]: ("transformer.ln_f", False, None), N[T.OUTPUT]: ("lm_head", False, None)}
        per_block = ((T.ATTN_NORM, "ln_1", False), (T.ATTN_QKV, "attn.c_attn", True), (T.ATTN_OUT, "attn.c_proj", True),
                     (T.FFN_NORM, "ln_2", False), (T.FFN_UP, "mlp.c_fc", True), (T.FFN_DOWN, "mlp.c_proj", True))
        for i in range(model.num_layers):
            names |= {N[k].format(bid=i): (f"transformer.h.{i}.{n}", t, None) for k, n, t in per_block}
    else:
        names |= {N[T.TOKEN_EMBD]: ("model.embed_tokens", False, None), N[T.OUTPUT_NORM]: ("model.norm", False, None),
                  N[T.OUTPUT]: ("lm_head", False, None)}
        per_block = ((T.ATTN_NORM, "input_layernorm", None), (T.FFN_NORM, "post_attention_layernorm", None),
                     (T.ATTN_Q, "self_attn.q_proj", heads), (T.ATTN_K, "self_attn.k_proj", groups),
                     (T.ATTN_V, "self_attn.v_proj", None), (T.ATTN_OUT, "self_attn.o_proj", None),
                     (T.FFN_GATE, "mlp.gate_proj", None), (T.FFN_UP, "mlp.up_proj", None), (T.FFN_DOWN, "mlp.down_proj", None))
        for i in range(model.num_layers):
            names |= {N[k].format(bid=i): (f"model.layers.{i}.{n}", False, r) for k, n, r in per_block}
    state = {}
    for name, tensor in tensors.items():
        base, _, suffix = name.rpartition(".")
        if base not in names:
            raise ConversionError(f"GGUF tensor {name} has no place in the {'GPT-2' if gpt2 else 'Llama'} layout")
        hf, transpose, rope_heads = names[base]
        if rope_heads:
            tensor = rope_halves(tensor, rope_heads)
        state[f"{hf}.{suffix}"] = tensor.t() if transpose and suffix == "weight" else tensor
    if model.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in state.items()}


def rope_neighbours(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Q or K rows (heads d, ...) from rotate-half order to llama.cpp's adjacent-pair order:
    within a head, row j < d/2 moves to 2j and row d/2 + j to 2j + 1."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def rope_halves(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `rope_neighbours`."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def read_gguf(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(every tensor as fp32, dequantized, in torch's (out, in) orientation; the vocabulary) of a GGUF file.
    NOTE: parsing is the slow part (the reader walks a 50k-piece vocabulary field by field), so it happens once."""
    import gguf

    reader = _reader(path)
    tensors = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
               for t in reader.tensors}
    field = reader.fields["tokenizer.ggml.tokens"]
    return tensors, [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ConversionError(f"{path}: cannot read it as GGUF ({e})") from None


def _write_header(writer, model: ModelConfig, dtype: str, origin: str) -> None:
    import gguf

    writer.add_name(f"scalelm {origin}")
    writer.add_context_length(model.max_position_embeddings)
    writer.add_embedding_length(model.hidden_size)
    writer.add_block_count(model.num_layers)
    writer.add_feed_forward_length(model.ffn_hidden_size)
    writer.add_head_count(model.num_heads)
    writer.add_head_count_kv(model.num_kv_heads or model.num_heads)
    if model.normalization == "layernorm":
        writer.add_layer_norm_eps(model.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(model.norm_eps)
        writer.add_rope_freq_base(model.rope_base)
        writer.add_rope_dimension_count(model.hidden_size // model.num_heads)
        writer.add_vocab_size(model.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _encode(tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, object]:
    """The array to store and its GGML type: 1-D tensors f32; matrices in `dtype` (q8_0 where rows allow)."""
    import gguf

    array = tensor.float().numpy()
    if array.ndim == 1 or dtype == "f32":
        return array, gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if dtype == "q8_0" and array.shape[-1] % block == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16
