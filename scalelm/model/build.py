"""Build the model of a run on this rank's layout: the GPT, or its list of layers as a DeepSpeed pipeline.

    parallel.pipeline == 1   GPT (model/gpt.py): the layers in order, token ids in, logits out
    parallel.pipeline > 1    the same layers as DeepSpeed layer specs in a PipelineModule (1F1B); this rank
                             builds its stage's share

Every layer has a name, the one the single-process GPT gives it (`embedding`, `blocks.0` ... `blocks.L-1`, `norm`,
`head`), and a pipeline stage is told its layers' names, so `canonical_parameters` names every parameter as one
process does on any layout: checkpoints, resharding and the conversions know a tensor by that name alone.

It ends in the language-model head, or with `num_labels` in a classification head of that many scores (the
objective says which: objectives/base.py). With finetune.lora the built model's weights are frozen and adapters
added to its linears (model/lora.py). With train.compile each transformer layer is compiled by torch.compile, one
graph per layer. Training, evaluation, scoring and the conversion's parity check all start here; the engine
(parallel/engine.py) then wraps the module it is given. The module knows no loss.
"""

from __future__ import annotations

import contextlib
import io

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from scalelm.config import Config
from scalelm.model.gpt import GPT, Activations, Block, Embedding, FinalNorm, Head, ScoreHead, recompute
from scalelm.model.lora import apply_lora
from scalelm.model.spec import layer_spec, transformer_config

EMBEDDING = "embedding"  # the first layer's name, and the key its weight is tied under to the last stage's head


def build_model(cfg: Config, layout, vocab_size: int, documents: bool = False,
                num_labels: int | None = None) -> torch.nn.Module:
    """The model for `layout` (scalelm.parallel.topology.Layout), on the CPU, initialised from train.seed.
    `documents`: the batches carry packed documents (position_ids and document_ids); `num_labels`: a
    classification head of that many scores instead of the language model's."""
    on_gpu = layout.device.type == "cuda"
    tc = transformer_config(cfg.model, cfg.parallel, on_gpu=on_gpu, recompute=cfg.train.activation_checkpointing)
    lora = cfg.finetune.lora
    spec = layer_spec(on_gpu, documents, fused_norms=lora is None, causal=cfg.model.causal)
    full_recompute = cfg.train.activation_checkpointing == "full"
    if layout.pipeline == 1:
        model = GPT(cfg.model, tc, spec, vocab_size, cfg.train.seed, recompute_blocks=full_recompute,
                    packed_attention=cfg.train.packed_attention, num_labels=num_labels)
    else:
        names, specs = zip(*pipeline_layers(cfg, tc, spec, vocab_size, num_labels))
        with contextlib.redirect_stdout(io.StringIO()):  # NOTE: DeepSpeed prints its seeds, grid and stages' layers
            model = PipelineModule(list(specs), topology=layout.deepspeed_topology(), partition_method="type:Block",
                                   activation_checkpoint_interval=int(full_recompute),
                                   activation_checkpoint_func=_recompute, checkpointable_layers=["Block"])
        model.layer_names = names  # read by canonical_parameters
    model = model if lora is None else apply_lora(model, lora, cfg.train.seed)
    if cfg.train.compile:
        for block in (module for module in model.modules() if isinstance(module, Block)):
            block.compile()  # in place: the parameters keep their names, so checkpoints do not see it
    return model


def pipeline_layers(cfg: Config, tc, spec, vocab_size: int, num_labels: int | None) -> list[tuple[str, LayerSpec]]:
    """(name, DeepSpeed layer spec) of each layer of the GPT; a tied embedding is one weight shared by the first and
    the last stage (its key is the embedding's name)."""
    m, seed = cfg.model, cfg.train.seed
    tied = m.tie_embeddings and num_labels is None  # a score head ties nothing
    embed = (TiedLayerSpec(EMBEDDING, Embedding, m, tc, vocab_size, seed, tied_weight_attr="word.weight")
             if tied else LayerSpec(Embedding, m, tc, vocab_size, seed))
    head = (LayerSpec(ScoreHead, m, tc, num_labels, seed) if num_labels
            else TiedLayerSpec(EMBEDDING, Embedding, m, tc, vocab_size, seed, positions=False, forward_fn=_tied_logits,
                               tied_weight_attr="word.weight")
            if tied else LayerSpec(Head, m, tc, vocab_size, seed))
    blocks = [(f"blocks.{i - 1}", LayerSpec(Block, m, tc, spec, i, seed, cfg.train.packed_attention))
              for i in range(1, m.num_layers + 1)]
    return [(EMBEDDING, embed), *blocks, ("norm", LayerSpec(FinalNorm, m, tc, seed)), ("head", head)]


def canonical_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """This rank's parameters, frozen ones too, under the names the single-process GPT gives them, in a fixed order.
    A pipeline stage's are named by its layers' declared names: DeepSpeed registers layer i as "i" and a tied
    module as "tied_modules.KEY", its key being the name of the layer it belongs to."""
    names = getattr(module, "layer_names", None)
    if names is None:
        return list(module.named_parameters())
    out = []
    for name, param in module.named_parameters():
        first, _, rest = name.partition(".")
        if first == "tied_modules":
            key, _, rest = rest.partition(".")
            out.append((f"{key}.{rest}", param))
        else:
            out.append((f"{names[int(first)]}.{rest}", param))
    return out


def _recompute(function, *x: torch.Tensor) -> Activations:
    """DeepSpeed's pipeline hands its activations unpacked; megatron's checkpoint replays the model-parallel
    RNG streams (DeepSpeed's own would not know them)."""
    return recompute(lambda inputs: function(*(inputs if isinstance(inputs, tuple) else (inputs,))),
                     x if len(x) > 1 else x[0])


def _tied_logits(embedding: Embedding, x: Activations) -> torch.Tensor:
    return embedding.logits(x)
