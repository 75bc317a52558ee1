"""Build the model of a run on this rank's layout: the GPT, or its list of layers as a DeepSpeed pipeline.

    parallel.pipeline == 1   GPT (model/gpt.py): the layers in order, token ids in, logits out
    parallel.pipeline > 1    the same layers as DeepSpeed layer specs in a PipelineModule (1F1B); this rank
                             builds its stage's share

With finetune.lora the built model's weights are frozen and adapters added to its linears (model/lora.py).
With train.compile each transformer layer is compiled by torch.compile, one graph per layer.

Training, evaluation, scoring and the conversion's parity check all start here; the engine
(parallel/engine.py) then wraps the module it is given, with or without an optimizer. The module
knows no loss: the engine attaches the objective (for the pipeline, as the last stage's `loss_fn`).
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from scalelm.config import Config
from scalelm.model.gpt import GPT, Activations, Block, Embedding, FinalNorm, Head, ScoreHead, recompute
from scalelm.model.lora import apply_lora
from scalelm.model.spec import layer_spec, transformer_config


def build_model(cfg: Config, layout, vocab_size: int, documents: bool = False) -> torch.nn.Module:
    """The model for `layout` (scalelm.parallel.topology.Layout), on the CPU, initialised from train.seed.
    `documents`: the batches carry packed documents (position_ids and document_ids)."""
    on_gpu = layout.device.type == "cuda"
    tc = transformer_config(cfg.model, cfg.parallel, on_gpu=on_gpu, recompute=cfg.train.activation_checkpointing)
    lora = cfg.finetune.lora
    spec = layer_spec(on_gpu, documents, fused_norms=lora is None)
    full_recompute = cfg.train.activation_checkpointing == "full"
    if layout.pipeline == 1:
        model = GPT(cfg.model, tc, spec, vocab_size, cfg.train.seed, recompute_blocks=full_recompute,
                    packed_attention=cfg.train.packed_attention, num_labels=num_labels(cfg))
    else:
        from scalelm.parallel.topology import deepspeed_topology

        model = PipelineModule(pipeline_layers(cfg, tc, spec, vocab_size), topology=deepspeed_topology(layout),
                               partition_method="type:Block", activation_checkpoint_interval=int(full_recompute),
                               activation_checkpoint_func=_recompute, checkpointable_layers=["Block"])
    model = model if lora is None else apply_lora(model, lora, cfg.train.seed)
    if cfg.train.compile:
        for block in (module for module in model.modules() if isinstance(module, Block)):
            block.compile()  # in place: the parameters keep their names, so checkpoints do not see it
    return model


def num_labels(cfg: Config) -> int | None:
    """The classification head's outputs (finetune.head=classification), None for the language model's head."""
    return cfg.finetune.num_labels if cfg.finetune.head == "classification" else None


def pipeline_layers(cfg: Config, tc, spec, vocab_size: int) -> list:
    """The GPT as DeepSpeed layer specs; a tied embedding is one weight shared by the first and last stage."""
    m, seed = cfg.model, cfg.train.seed
    tied = m.tie_embeddings and num_labels(cfg) is None  # a score head ties nothing
    embed = (TiedLayerSpec("embedding", Embedding, m, tc, vocab_size, seed, tied_weight_attr="word.weight")
             if tied else LayerSpec(Embedding, m, tc, vocab_size, seed))
    head = (LayerSpec(ScoreHead, m, tc, num_labels(cfg), seed) if num_labels(cfg)
            else TiedLayerSpec("embedding", Embedding, m, tc, vocab_size, seed, positions=False, forward_fn=_tied_logits,
                               tied_weight_attr="word.weight")
            if tied else LayerSpec(Head, m, tc, vocab_size, seed))
    blocks = [LayerSpec(Block, m, tc, spec, i, seed, cfg.train.packed_attention) for i in range(1, m.num_layers + 1)]
    return [embed, *blocks, LayerSpec(FinalNorm, m, tc, seed), head]


def _recompute(function, *x: torch.Tensor) -> Activations:
    """DeepSpeed's pipeline hands its activations unpacked; megatron's checkpoint replays the model-parallel
    RNG streams (DeepSpeed's own would not know them)."""
    return recompute(lambda inputs: function(*(inputs if isinstance(inputs, tuple) else (inputs,))),
                     x if len(x) > 1 else x[0])


def _tied_logits(embedding: Embedding, x: Activations) -> torch.Tensor:
    return embedding.logits(x)
