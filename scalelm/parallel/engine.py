"""DeepSpeed assembly: the GPT (or its pipeline of layers), AdamW, the schedule, ZeRO and precision.

    parallel.pipeline == 1   GPT inside a plain DeepSpeedEngine, ZeRO stage 1-3 over the data group
    parallel.pipeline > 1    the layer list in a DeepSpeed PipelineModule, 1F1B, ZeRO-1

`Engine.train_step` takes one optimizer step from an iterator of micro-batches and returns the
step's mean loss over the whole global batch; `Engine.eval_loss` averages the loss of micro-batches
without touching the weights. A step whose gradients are not finite is skipped by DeepSpeed's ZeRO
optimizer (weights, moments and schedule untouched; `step_applied` says so). For checkpoints,
`gather` / `scatter` move each parameter's state as whole tensors (see state.py) and
`counters` / `load_counters` the rest: AdamW's step count, the schedule and DeepSpeed's own counts.
Everything about which rank holds what stays in here.
"""

from __future__ import annotations

from typing import Iterator

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from megatron.core import parallel_state, tensor_parallel

from scalelm.config import Config
from scalelm.model.gpt import GPT, Block, Embedding, FinalNorm, Head, lm_loss
from scalelm.model.spec import layer_spec, transformer_config
from scalelm.parallel import state
from scalelm.parallel.grads import sum_sequence_parallel_grads
from scalelm.parallel.topology import Layout, MegatronMPU, deepspeed_topology
from scalelm.train.schedule import lr_scheduler


def grad_accum_steps(cfg: Config, layout: Layout) -> int:
    """Micro-batches per rank per optimizer step: global = micro x accum x data-parallel (validated)."""
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.data)


def deepspeed_config(cfg: Config, layout: Layout) -> dict:
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, layout),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # bf16 gradients accumulate over micro-batches in fp32 (DeepSpeed does this under ZeRO-1)
        **({"data_types": {"grad_accum_dtype": "fp32"}} if t.precision == "bf16" and cfg.parallel.zero_stage == 1 else {}),
        "bf16": {"enabled": t.precision == "bf16"},
        # Dynamic loss scaling: start at 2^16, halve on overflow, double after 1000 clean steps.
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms and other vectors are not decayed."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pipeline_layers(cfg: Config, tc, spec, vocab_size: int) -> list:
    """The GPT as DeepSpeed layer specs; a tied embedding is one weight shared by the first and last stage."""
    m, seed = cfg.model, cfg.train.seed
    embed = (TiedLayerSpec("embedding", Embedding, m, tc, vocab_size, seed, tied_weight_attr="word.weight")
             if m.tie_embeddings else LayerSpec(Embedding, m, tc, vocab_size, seed))
    head = (TiedLayerSpec("embedding", Embedding, m, tc, vocab_size, seed, positions=False, forward_fn=_tied_logits,
                          tied_weight_attr="word.weight")
            if m.tie_embeddings else LayerSpec(Head, m, tc, vocab_size, seed))
    blocks = [LayerSpec(Block, m, tc, spec, i, seed) for i in range(1, m.num_layers + 1)]
    return [embed, *blocks, LayerSpec(FinalNorm, m, tc, seed), head]


def _recompute(function, *args):
    """Full activation checkpointing in the pipeline through megatron's checkpoint, which replays the
    model-parallel RNG streams (DeepSpeed's own would not know them)."""
    return tensor_parallel.checkpoint(function, False, *args)


def _tied_logits(embedding: Embedding, hidden: torch.Tensor) -> torch.Tensor:
    return embedding.logits(hidden)


class Engine:
    """The model on this rank, wrapped by DeepSpeed, one optimizer step at a time."""

    def __init__(self, cfg: Config, layout: Layout, vocab_size: int):
        on_gpu = layout.device.type == "cuda"
        tc = transformer_config(cfg.model, cfg.parallel, on_gpu=on_gpu, recompute=cfg.train.activation_checkpointing)
        spec = layer_spec(on_gpu)
        self.pipeline = layout.pipeline > 1
        if self.pipeline:
            module = PipelineModule(pipeline_layers(cfg, tc, spec, vocab_size), topology=deepspeed_topology(layout),
                                    loss_fn=lm_loss, partition_method="type:Block",
                                    activation_checkpoint_interval=int(cfg.train.activation_checkpointing == "full"),
                                    activation_checkpoint_func=_recompute, checkpointable_layers=["Block"])
        else:
            module = GPT(cfg.model, tc, spec, vocab_size, cfg.train.seed,
                         recompute_blocks=cfg.train.activation_checkpointing == "full")
        if cfg.parallel.sequence_parallel:
            sum_sequence_parallel_grads(module, parallel_state.get_tensor_model_parallel_group())
        module.to(layout.device)
        o = cfg.optim
        optimizer = torch.optim.AdamW(param_groups(module, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                      eps=o.eps, fused=on_gpu)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=lr_scheduler(optimizer, o),
            config=deepspeed_config(cfg, layout), mpu=None if self.pipeline else MegatronMPU())
        # AdamW's state exists from the start, so checkpoints can read and load it before any step
        state.init_optimizer_state(self.optimizer)
        self.layout = layout
        self.grad_accum = grad_accum_steps(cfg, layout)

    def train_step(self, batches: Iterator[dict]) -> float:
        """One optimizer step over grad_accum micro-batches; the mean loss of the global batch."""
        if self.pipeline:
            return self.engine.train_batch(data_iter=self._pairs(batches)).item()
        total = torch.zeros((), device=self.layout.device)
        for _ in range(self.grad_accum):
            batch = next(batches)
            loss = self.engine(batch["input_ids"].to(self.layout.device), batch["labels"].to(self.layout.device))
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        return self._data_parallel_mean(total / self.grad_accum)

    @torch.no_grad()
    def eval_loss(self, batches: Iterator[dict], micro_batches: int) -> float:
        """Mean loss over `micro_batches` micro-batches per data-parallel rank, weights untouched."""
        if self.pipeline:
            return self.engine.eval_batch(self._pairs(batches), num_micro_batches=micro_batches).item()
        self.engine.eval()
        total = torch.zeros((), device=self.layout.device)
        for _ in range(micro_batches):
            batch = next(batches)
            total += self.engine(batch["input_ids"].to(self.layout.device),
                                 batch["labels"].to(self.layout.device)).float()
        self.engine.train()
        return self._data_parallel_mean(total / micro_batches)

    @property
    def step_applied(self) -> bool:
        """False when DeepSpeed skipped the last step (gradients not finite, or an fp16 overflow)."""
        return self.engine.was_step_applied()

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """This rank's parameters under single-process names, in the order every rank of a stage agrees on."""
        return state.named_parameters(self.engine.module)

    def gather(self, param: torch.nn.Parameter, key: str) -> torch.Tensor:
        """The whole fp32 `key` state (param / exp_avg / exp_avg_sq) of `param`; collective."""
        return state.gather(param, key, self.optimizer)

    def whole_shape(self, param: torch.nn.Parameter) -> tuple[int, ...]:
        return state.whole_shape(param)

    def scatter(self, param: torch.nn.Parameter, key: str, whole: torch.Tensor) -> None:
        """Set the `key` state of `param` from its whole fp32 value; collective under ZeRO-3."""
        state.scatter(param, key, whole, self.optimizer)

    def counters(self) -> dict:
        """Everything but tensors that the next step depends on, as JSON-safe data."""
        scaler = getattr(self.optimizer, "loss_scaler", None)
        return {"adam_steps": state.optimizer_steps(self.optimizer), "schedule_step": self.scheduler.last_epoch,
                "global_steps": self.engine.global_steps, "global_samples": self.engine.global_samples,
                "skipped_steps": self.engine.skipped_steps,
                "loss_scaler": {k: v for k, v in vars(scaler).items() if isinstance(v, (int, float, bool))}
                if scaler is not None else None}

    def load_counters(self, counters: dict) -> None:
        state.set_optimizer_steps(self.optimizer, counters["adam_steps"])
        # Only the position in the schedule is restored: the schedule itself is the config's, so a
        # resumed run may change optim.lr or the decay.
        sched = self.scheduler
        sched.last_epoch = counters["schedule_step"]
        sched._step_count = sched.last_epoch + 1
        sched._last_lr = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(sched.optimizer.param_groups, sched._last_lr):
            group["lr"] = lr
        self.engine.global_steps = counters["global_steps"]
        self.engine.global_samples = counters["global_samples"]
        self.engine.skipped_steps = counters["skipped_steps"]
        scaler = getattr(self.optimizer, "loss_scaler", None)
        if scaler is not None and counters["loss_scaler"]:
            for key, value in counters["loss_scaler"].items():
                setattr(scaler, key, value)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def grad_norm(self) -> float | None:
        """The global gradient norm of the last step, before clipping (None where DeepSpeed keeps none)."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def _pairs(self, batches: Iterator[dict]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in batches:
            yield batch["input_ids"].to(self.layout.device), batch["labels"].to(self.layout.device)

    def _data_parallel_mean(self, loss: torch.Tensor) -> float:
        if self.layout.data > 1:
            dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            loss /= self.layout.data
        return loss.item()
