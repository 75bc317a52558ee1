"""`scalelm plan`: will this config run on that cluster, how much memory per GPU, how fast, and if it does not
fit, which layouts would. Arithmetic only: nothing is allocated, no process group.

Memory is what DeepSpeed 0.19.8 and megatron-core hold on one rank of the most loaded pipeline stage, read
from their code and checked against the peak memory of tiny CPU runs (tests/parallel/test_plan_memory.py,
bench/plan_memory_probe.py) and of one-GPU runs (tests/gpu/test_plan_gpu.py; bench/plan_memory_findings.md).
Ψ: the parameters the rank holds after the tensor and pipeline split; d: the data-parallel ranks; w: bytes per
element of the training precision (4 fp32, 2 bf16/fp16); B = 5e8: DeepSpeed's reduce bucket in elements. Some
memory is held for the whole run; the rest comes and goes within a step, at moments that do not overlap, and
the peak is what is held plus the largest moment:

    held      weights Ψ·w (ZeRO-3: /d); DeepSpeed's own fp32 master copy 4Ψ/d, in fp32 training too; AdamW's
              moments 8Ψ/d. bf16 under ZeRO-1 runs DeepSpeed's bf16 optimizer, whose fp32 gradient accumulator
              is 4Ψ on every rank. ZeRO-3: its gradient partition Ψ/d·w and its reduce bucket. The last pipeline
              stage: the logits its pipeline buffers keep.
    forward   ZeRO-3: the gathered parameters and the all-gather buffer, beside the layers' activations.
    backward  its start: activations of the micro-batches in flight (Korthikanti et al. 2022, without the s×s
              attention scores, which torch SDPA does not keep), the loss's logits and fp32 softmax (then the
              output layer's weight gradient), and the gradients of earlier micro-batches if they are there.
    reduce    the end of the step's last backward: the gradients in DeepSpeed's bucket and the flat copy it
              all-reduces (or reduce-scatters).
    step      the reduced gradient partition and its flat fp32 copy AdamW steps on (AdamW is fused: no temporaries).

LoRA (finetune.lora, model/lora.py): every base weight is frozen. DeepSpeed's ZeRO-1/2 and bf16 optimizers
flatten only `is_optimized_parameter`s (requires_grad) into their groups, and ZeRO-3, which partitions every
weight (its Init takes all of module.parameters()), makes its fp32 copy and gradient partition from the
trainable groups alone; gradient hooks, and so bucket traffic, are the trainable ones'. So the weights are
held as above, frozen ones too (ZeRO-3: /d), and every other Ψ above is the rank's adapters, Ψ_A (on a GPU
the buckets are still made whole: B elements). The frozen linears keep no input (megatron's
linear_with_frozen_weight saves only the weight), the adapters keep theirs (layer_activations), the backward
still computes the activations' gradients through every frozen layer, and the loss makes no output-layer
gradient.

Left out, being small beside these: the embedding's output on the first stage (with LoRA not even the first
norm's input, which needs no gradient, or the frozen head's), biases, norms and adapters that ZeRO-3 keeps
whole (under 1e5 elements, its persistence threshold), the hidden states the pipeline passes between stages,
the gradient norm's fp64 copy of one gradient, and the communication libraries' own buffers. The CUDA
context, NCCL's buffers and the allocator's fragmentation are what HEADROOM leaves free.
Host memory, apart: with checkpoint.background, the copy a rank writes its checkpoint from (snapshot_bytes).

A GPU and the CPU runs the model is checked on differ in two ways. On a GPU, DeepSpeed's buckets are
allocated whole when made (torch.empty of B elements); on the CPU only the pages written count (a bucket holds
at most Ψ gradients). And gloo's reduce-scatter is an all-reduce of a second full copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from scalelm.config import Config, ModelConfig, validate
from scalelm.config.finetune import COLUMN, adapter_parameters, layer_sides
from scalelm.model.size import flops_per_token_megatron, parameter_count
from scalelm.model.spec import padded_vocab_size

GiB = 2**30
# name: (memory in bytes, dense bf16 peak FLOP/s)
GPUS = {"a100": (80 * 2**30, 312e12), "h100": (80 * 2**30, 989e12), "h200": (141 * 10**9, 989e12)}
HEADROOM = 0.9  # of a GPU's memory the plan lets a run use: the rest is the CUDA context, NCCL and fragmentation

# DeepSpeed's defaults, in elements, which scalelm's deepspeed_config leaves as they are
# (tests/parallel/test_plan.py checks them against DeepSpeed's own).
REDUCE_BUCKET = 500_000_000  # zero_optimization.reduce_bucket_size: gradients ZeRO reduces at once
ALLREDUCE_BUCKET = 500_000_000  # the engine's all-reduce bucket, used by the bf16 optimizer (no ZeRO buckets)
PREFETCH_BUCKET = 50_000_000  # zero_optimization.stage3_prefetch_bucket_size: parameters ZeRO-3 gathers at once
MAX_REUSE_DISTANCE = 1_000_000_000  # zero_optimization.stage3_max_reuse_distance


@dataclass(frozen=True)
class Term:
    """One named quantity of memory on a rank; `what` says in a few words what it is."""

    name: str
    bytes: float
    what: str = ""


@dataclass
class Memory:
    """Bytes on one rank of a pipeline stage: held for the whole run, plus each moment of a step."""

    stage: str
    held: list[Term]
    moments: dict[str, list[Term]]
    in_flight: int
    activations: dict[str, float]  # this stage's activations under each train.activation_checkpointing
    snapshot: float  # host memory, not the GPU's: a checkpoint's copy with checkpoint.background, else 0

    def moment_bytes(self, name: str) -> float:
        return sum(term.bytes for term in self.moments[name])

    @property
    def held_bytes(self) -> float:
        return sum(term.bytes for term in self.held)

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=self.moment_bytes)

    @property
    def total(self) -> float:
        """The peak: what is held plus the largest moment."""
        return self.held_bytes + self.moment_bytes(self.peak_moment)


@dataclass
class Plan:
    cfg: Config
    world: int
    parameters: int
    trainable: int  # the parameters AdamW trains: all of them, or with finetune.lora the adapters
    memory: Memory  # the most loaded stage's
    stages: dict[str, Memory]  # "only", or the "first" and the "last" pipeline stage
    micro_batches: int
    bubble: float
    flops_per_step: float

    def for_rank(self, rank: int) -> Memory:
        """The memory of global rank `rank` (pipeline stage = rank // (tensor x data); a middle stage is counted
        as the first, which holds more)."""
        stage = rank // (self.world // self.cfg.parallel.pipeline)
        return self.stages["only" if self.cfg.parallel.pipeline == 1 else
                           "last" if stage == self.cfg.parallel.pipeline - 1 else "first"]

    def fits(self, gpu_bytes: float) -> bool:
        return self.memory.total <= HEADROOM * gpu_bytes

    def step_seconds(self, peak_flops: float, mfu: float) -> float:
        return self.flops_per_step / (self.world * peak_flops * mfu)


def plan(cfg: Config, world: int, on_gpu: bool = True) -> Plan:
    """The plan of `cfg` on `world` GPUs (or, on_gpu=False, CPU ranks over gloo); ConfigError when the layout
    does not divide."""
    cfg = copy.deepcopy(cfg)
    validate(cfg, world_size=world)
    m, p, t = cfg.model, cfg.parallel, cfg.train
    vocab = padded_vocab_size(m.vocab_size)
    data = world // (p.tensor * p.pipeline)
    micro_batches = t.global_batch_size // (t.micro_batch_size * data)
    positions = m.max_position_embeddings * m.hidden_size if m.position_embedding == "learned" else 0
    total = parameter_count(m, vocab) + positions
    lora = cfg.finetune.lora
    trainable = total if lora is None else adapter_parameters(m, lora)
    stages = {stage: stage_memory(cfg, data, micro_batches, stage, on_gpu)
              for stage in (["only"] if p.pipeline == 1 else ["first", "last"])}
    memory = max(stages.values(), key=lambda mem: mem.total)
    full_recompute = t.activation_checkpointing == "full"
    flops = flops_per_token_megatron(m, vocab, t.seq_len, full_recompute)
    if lora is not None:  # no weight gradient of a frozen weight: a third of megatron's dense and head terms;
        # the input gradients and the attention's stay, and each adapter's parameter costs 6 FLOPs (8 recomputed)
        flops += -24 * m.num_layers * m.hidden_size ** 2 - 2 * vocab * m.hidden_size + (8 if full_recompute else 6) * trainable
    bubble = (p.pipeline - 1) / (micro_batches + p.pipeline - 1)
    return Plan(cfg, world, total, trainable, memory, stages, micro_batches, bubble, flops * t.global_batch_size * t.seq_len)


def rank_parameters(m: ModelConfig, vocab: int, tensor: int, pipeline: int, stage: str) -> tuple[float, float]:
    """(all, in transformer layers) parameters that one rank of `stage` ("only", "first", "last") holds. The
    last stage holds the head, or with tied embeddings its own copy of the embedding (DeepSpeed's TiedLayerSpec)."""
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = h // m.num_heads * m.num_kv_heads
    fc1 = 2 * f if m.activation == "swiglu" else f
    norm = h * (2 if m.bias and m.normalization == "layernorm" else 1)
    # column-parallel (qkv, fc1) and row-parallel (proj, fc2) weights split over tensor ranks, as do the
    # column-parallel biases; the row-parallel biases and the norms are whole on every tensor rank
    split = h * (h + 2 * kv) + h * h + h * fc1 + f * h + ((h + 2 * kv) + fc1 if m.bias else 0)
    whole = 2 * norm + (2 * h if m.bias else 0)
    layers = m.num_layers // pipeline * (split / tensor + whole)
    embedding = vocab * h / tensor
    positions = m.max_position_embeddings * h if m.position_embedding == "learned" else 0
    head = 0 if m.tie_embeddings and stage == "only" else embedding
    ends = {"only": embedding + positions + norm + head, "first": embedding + positions, "last": norm + head}[stage]
    return layers + ends, layers


def rank_adapters(m: ModelConfig, cfg: Config) -> float:
    """The LoRA adapters' parameters one rank of a pipeline stage holds: A (r, in) and B (out, r) of each target
    of each of its layers, B split over tensor ranks on a column-parallel base (qkv, fc1), A on a row-parallel
    one (proj, fc2); the other whole on every tensor rank. 0 without finetune.lora."""
    lora, t = cfg.finetune.lora, cfg.parallel.tensor
    if lora is None:
        return 0
    per_layer = 0.0
    for target in lora.targets:
        fan_in, fan_out = layer_sides(m, target)
        column = target in COLUMN
        per_layer += lora.rank * (fan_in + fan_out / t if column else fan_in / t + fan_out)
    return m.num_layers // cfg.parallel.pipeline * per_layer


def layer_activations(m: ModelConfig, cfg: Config, bytes_per: int, recompute: str, on_gpu: bool = True) -> float:
    """Bytes one transformer layer keeps for its backward, per micro-batch (Korthikanti et al. 2022, table 2,
    in elements of `bytes_per` bytes, without the attention scores: SDPA keeps only its output and log-sum-exp).

    In units of s·b·h elements: the two norms' inputs and outputs (4, whole on every tensor rank unless sequence
    parallel), q, k, v ((h + 2·kv)/h), the attention output (1), the MLP's first output and its activation
    (fc1/h + f/h: 4 + 4 with GELU); 16 for GPT-3, which at 2 bytes plus the two residual dropouts' one-byte masks is
    Korthikanti's 10 + 24/t, or 34/t with sequence parallelism. Full recomputation keeps each layer's input (1).

    With LoRA the frozen linears keep no input (megatron's linear_with_frozen_weight), and an adapter keeps what
    A reads: the whole input of qkv and fc1 (under sequence parallelism gathered along the sequence: 1, not 1/t),
    this rank's 1/t of fc2's (f/h); proj's input is the attention's output, which SDPA keeps anyway. Each adapter
    also keeps its rank-r intermediate A x for B (r/h; on proj and fc2 under sequence parallelism 1/t of it),
    and with lora.dropout its mask (one byte an element on a GPU; on the CPU torch multiplies by a noise tensor
    of the input's dtype) and, on proj, the dropped-out copy of the input."""
    p, t = cfg.parallel, cfg.train
    h, f = m.hidden_size, m.ffn_hidden_size
    sbh = t.seq_len * t.micro_batch_size * h
    along_sequence = p.tensor if p.sequence_parallel else 1
    if recompute == "full":
        return sbh * bytes_per / along_sequence
    kv = h // m.num_heads * m.num_kv_heads
    fc1 = 2 * f if m.activation == "swiglu" else f
    masks = 2 if m.dropout > 0 else 0
    lora = cfg.finetune.lora
    if lora is None:
        split = (h + 2 * kv) / h + 1 + fc1 / h + f / h
        return sbh * ((4 * bytes_per + masks) / along_sequence + split * bytes_per / p.tensor)
    own = sbh * ((2 * bytes_per + masks) / along_sequence + ((h + 2 * kv) / h + 1 + fc1 / h) * bytes_per / p.tensor)
    sb, adapters = t.seq_len * t.micro_batch_size, 0.0
    for target in lora.targets:
        fan_in = layer_sides(m, target)[0]
        column = target in COLUMN
        reads = sb * fan_in / (1 if column else p.tensor)  # the input A reads (column: gathered under SP)
        kept = 0 if target == "proj" else reads
        intermediate = sb * lora.rank / (p.tensor if p.sequence_parallel and not column else 1)
        adapters += (kept + intermediate) * bytes_per
        if lora.dropout > 0:  # the mask over what this rank drops out (column: before the gather)
            adapters += (1 if on_gpu else bytes_per) * reads / (along_sequence if column else 1)
            adapters += reads * bytes_per if target == "proj" else 0
    return own + adapters


def stage_memory(cfg: Config, data: int, micro_batches: int, stage: str, on_gpu: bool = True) -> Memory:
    """The memory of one rank of `stage` ("only", "first" or "last" pipeline stage); see the module docstring."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    vocab = padded_vocab_size(m.vocab_size)
    base, base_layers = rank_parameters(m, vocab, p.tensor, p.pipeline, stage)
    lora, adapters = cfg.finetune.lora, rank_adapters(m, cfg)
    # held: every weight; psi: what AdamW trains and DeepSpeed keeps master copies, gradients and buckets of
    held_psi, psi_layers = base + adapters, base_layers + adapters
    psi = base if lora is None else adapters
    d, w, zero = data, 4 if t.precision == "fp32" else 2, p.zero_stage
    # engine.py asks for fp32 gradient accumulation with bf16 under ZeRO-1, and for that DeepSpeed runs its
    # bf16 optimizer instead of the ZeRO one
    bf16_optimizer = t.precision == "bf16" and zero == 1
    in_bucket = min(psi, REDUCE_BUCKET)
    bucket = (REDUCE_BUCKET if on_gpu else in_bucket) * w  # allocated whole on a GPU; pages written on the CPU

    frozen, of = (f", {base / 1e6:,.1f}M frozen", " adapters'") if lora is not None else ("", "")
    held = [Term("weights", held_psi * w / (d if zero == 3 else 1),
                 f"{t.precision}" + (f", / {d} (ZeRO-3)" if zero == 3 else "") + frozen),
            Term("fp32 master weights", 4 * psi / d, f"DeepSpeed's copy of this rank's{of} 1/{d}"),
            Term("AdamW moments", 8 * psi / d, f"two fp32 moments of this rank's{of} 1/{d}")]
    if bf16_optimizer:
        held.append(Term("fp32 gradients", 4 * psi, "the bf16 optimizer's accumulator, whole on every rank"))
    if zero == 3:
        held.append(Term("gradient partition", psi / d * w, f"ZeRO-3's reduced gradients, 1/{d}"))
        held.append(Term("reduce bucket", bucket, "ZeRO-3's, made at start"))

    last = stage in ("only", "last")
    logits = t.seq_len * t.micro_batch_size * vocab / p.tensor
    if stage == "last":
        held.append(Term("pipeline outputs", min(2, micro_batches) * logits * w,
                         "logits of the last micro-batches, kept in DeepSpeed's pipeline buffers"))

    # activations: the micro-batches in flight on this stage (1F1B: the first stage has min(pipeline, micro-batches)
    # forwards done before its first backward), each the stage's layers; under full recomputation one layer at
    # a time is recomputed in full during the backward
    in_flight = min(p.pipeline, micro_batches) if stage == "first" else 1
    layers = m.num_layers // p.pipeline
    per_layer = layer_activations(m, cfg, w, "none", on_gpu)
    activations = {"none": in_flight * layers * per_layer}
    activations["full"] = in_flight * layers * layer_activations(m, cfg, w, "full") + per_layer
    activations["selective"] = activations["none"]  # megatron's selective recomputation drops only the s×s scores
    acts = Term("activations", activations[t.activation_checkpointing],
                f"{in_flight} micro-batch{'es' if in_flight > 1 else ''} x {layers} layers")
    # The loss: the logits in the training precision (masked to the vocabulary, cast to fp32; in the backward,
    # their gradient), and the cross entropy's fp32 softmax, which the backward frees just before it makes its first
    # weight gradient, the output layer's (V/t x h), while every activation is still there.
    head_gradient = vocab / p.tensor * m.hidden_size * w if lora is None else 0  # LoRA: the head is frozen
    loss = [Term("logits", w * logits, "masked to the vocabulary, cast to fp32; then their gradient"),
            Term("softmax | head grad", max(4 * logits, head_gradient),
                 "the loss's fp32 softmax, then the output layer's weight gradient") if lora is None else
            Term("softmax", 4 * logits, "the loss's fp32 softmax (the output layer is frozen)")] if last else []

    # gradients of earlier micro-batches, still there when this stage's activations peak
    earlier = []
    if micro_batches > in_flight:
        if bf16_optimizer:
            earlier = [Term("bf16 gradients", 2 * psi, "param.grad, until the step")]
        elif zero == 1:
            earlier = [Term("gradients", psi * w, "param.grad, accumulated until the step")]
        elif zero == 2:
            earlier = [Term("gradient partition", psi / d * w, f"1/{d}, accumulated until the step")]

    moments: dict[str, list[Term]] = {}
    if zero == 3:
        # NOTE: a layer's gathered parameters stay until their next use unless 1e9 (stage3_max_reuse_distance)
        # parameters are fetched before it; between a layer's forward and its backward come the forward and the
        # backward of every later layer, so the last 5e8 stay gathered: all of any model below that size.
        gathered = Term("gathered parameters", min(held_psi, MAX_REUSE_DISTANCE / 2) * w, "ZeRO-3 keeps them to the backward")
        moments["forward"] = [gathered, Term("all-gather buffer", min(psi_layers, PREFETCH_BUCKET) * w,
                                             "one flat buffer per fetch, until the next"), acts]
        moments["backward"] = [gathered, acts, *loss]
        reduce_copy = in_bucket * w * (1 if on_gpu else 2)  # gloo's reduce-scatter: an all-reduce of a full copy
        moments["reduce"] = [Term("reduce-scatter copy", reduce_copy, "the bucket flattened")]
        moments["step"] = [Term("fp32 gradient", 4 * psi / d, "flat copy of the partition")]
    elif bf16_optimizer:
        bf16_grads = Term("bf16 gradients", 2 * psi, "param.grad, until the step")
        moments["backward"] = [*earlier, acts, *loss]
        moments["reduce"] = [bf16_grads] + ([Term("all-reduce copy", 4 * min(psi, ALLREDUCE_BUCKET),
                                                  "the fp32 gradients flattened")] if d > 1 else [])
        moments["step"] = [bf16_grads]
    else:  # DeepSpeed's ZeRO-1/2 optimizer: fp32 and fp16, and bf16 under ZeRO-2
        # the bucket (none on one rank: engine.py) is made at the first gradient; with a pipeline reduce_gradients makes a second
        contiguous, buckets = d > 1, bucket * (2 if p.pipeline > 1 and on_gpu else 1)
        moments["backward"] = [*earlier, acts, *loss] + ([Term("reduce bucket", bucket, "made at the first gradient")]
                                                         if on_gpu and contiguous else [])
        moments["reduce"] = [Term("reduce bucket", buckets, "the gradients copied in")] * contiguous + \
                            [Term("all-reduce copy", in_bucket * w, "the bucket flattened")]
        if zero == 2 and micro_batches > 1:
            moments["reduce"].append(Term("gradient partition", psi / d * w, f"1/{d}, accumulated until the step"))
        moments["step"] = [Term("gradient partition", psi / d * w, f"the reduced 1/{d}"),
                           Term("fp32 gradient", 4 * psi / d, "its flat copy AdamW steps on")]
    return Memory(stage, held, moments, in_flight, activations, snapshot_bytes(cfg, psi, d, vocab))


def snapshot_bytes(cfg: Config, psi: float, data: int, vocab: int) -> float:
    """The host memory a checkpoint saved in the background keeps (checkpoint/saver.py), on a rank holding `psi`
    trained parameters: the fp32 weight and two moments of the whole parameters it writes. Each is written whole
    by one of the stage's tensor x data ranks, the least loaded: about 1/(t·d) of the stage's psi·t, and at least
    the largest, the embedding or the head (which LoRA does not save). 0 without checkpoint.background."""
    if not cfg.checkpoint.background:
        return 0
    largest = vocab * cfg.model.hidden_size if cfg.finetune.lora is None else 0
    return 12 * max(psi / data, largest)
