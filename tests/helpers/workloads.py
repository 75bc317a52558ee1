"""What each spawned rank runs in the distributed tests (module-level, so the ranks can import them), and the
tiny configs they run; bench/ imports some of them too."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from megatron.core import parallel_state

from scalelm.config import load_config
from scalelm.model.build import canonical_parameters
from scalelm.model.gpt import GPT
from scalelm.model.spec import layer_spec, transformer_config
from scalelm.objectives.next_token import NextToken
from scalelm.objectives.tokens import token_losses
from scalelm.parallel.engine import Engine
from scalelm.parallel.gather import gather_tensor_parallel
from scalelm.parallel.grads import sum_sequence_parallel_grads
from scalelm.parallel.topology import destroy_distributed, init_distributed
from scalelm.train.optim import AdamW
from scalelm.train.schedule import Schedule

VOCAB = 200
LEARNABLE = 50  # tokens are drawn from the first 50 ids: a distribution the model can learn in a few steps
# the tiny model in the Llama layout: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied, no biases
LLAMA = ["model.position_embedding=rope", "model.normalization=rmsnorm", "model.activation=swiglu",
         "model.num_kv_heads=2", "model.tie_embeddings=false", "model.bias=false"]
# the layouts finetuning objectives are checked in against one process: (world size, overrides)
FINETUNE_LAYOUTS = {
    "tp2": (2, ["parallel.tensor=2"]),
    "tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "dp2-zero1": (2, ["parallel.zero_stage=1"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3"]),
    "tp2xpp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
}
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "train.seq_len=16",
        "train.micro_batch_size=2", "train.global_batch_size=2", "train.precision=fp32"]


def tiny_config(overrides: list[str]):
    return load_config(None, TINY + overrides)


def training_engine(cfg, layout, model: torch.nn.Module, objective=None) -> Engine:
    """The engine a run trains with: the objective (next-token by default), AdamW and the schedule of cfg.optim."""
    return Engine(cfg, layout, model, objective or NextToken(), AdamW(cfg.optim), Schedule(cfg.optim))


def with_reference(engine: Engine, micro: list[dict]) -> list[dict]:
    """This rank's share of the micro-batches (none on a rank that reads none), with the reference an objective like
    DPO needs when they lack one: the engine's own model with its adapters off, as a run's source adds it."""
    from scalelm.train.sources import InHand, ReferencePass

    micro = micro if engine.reads_data else []
    if engine.objective.reference and not (micro and "reference" in micro[0]):
        micro = ReferencePass(InHand(micro), engine).take(engine.grad_accum)
    return micro


def step(engine: Engine, micro: list[dict]) -> float:
    """One optimizer step on `micro`, the step's micro-batches (`with_reference`); its loss."""
    outcome = engine.forward_backward(with_reference(engine, micro))
    engine.optimizer_step()
    return outcome.loss


def forward_backward(overrides: list[str], seed: int = 0) -> dict:
    """One forward and backward of the tiny GPT on fixed tokens: the loss, and on rank 0 every whole gradient."""
    cfg = tiny_config(overrides)
    layout = init_distributed(cfg.parallel, seed)
    try:
        tc = transformer_config(cfg.model, cfg.parallel, on_gpu=False)
        model = GPT(cfg.model, tc, layer_spec(on_gpu=False), VOCAB, seed)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        if cfg.parallel.sequence_parallel:
            sum_sequence_parallel_grads(model, tp_group)
        tokens = torch.randint(0, LEARNABLE, (cfg.train.micro_batch_size, cfg.train.seq_len + 1),
                               generator=torch.Generator().manual_seed(seed))
        loss = token_losses(model(tokens[:, :-1]), tokens[:, 1:]).mean()
        loss.backward()
        grads = {name: gather_tensor_parallel(p.grad, p, tp_group) for name, p in model.named_parameters()}
        return {"loss": loss.item(), "grads": grads if layout.rank == 0 else None}
    finally:
        destroy_distributed()


def train_steps(overrides: list[str], steps: int = 3, seed: int = 0, masked: bool = False, packed: bool = False,
                keep_group: bool = False) -> dict:
    """`steps` optimizer steps on fixed global batches; every rank reports the loss of each step, and
    the first data-parallel rank the whole gradients of the first step under single-process names.

    Each step's global batch is the same tokens for every layout; a data-parallel rank takes its
    contiguous share of it in micro-batches, so every layout averages gradients over the same samples.
    `masked`: each sequence trains on its own share of its tokens (a loss mask, 5% to 95% of them), so
    micro-batches and data-parallel ranks hold different numbers of target tokens. `packed`: besides, each
    sequence is a window of packed documents (position_ids, document_ids), as SFT batches are. With
    finetune.lora in the overrides, the adapters' B start from whole random values instead of zero (so A's
    first gradients are not zero too), and rank 0 also reports every whole weight after training ("weights").
    With finetune.objective=dpo or reward the batches are packed preference pairs instead (`preference_batch`), with
    classify packed labelled texts (`labelled_batch`).
    `keep_group`: leave the process group for another call (megatron's groups are made anew each time)."""
    from scalelm.config import validate
    from scalelm.model.build import build_model
    from scalelm.objectives import objective_for

    cfg = tiny_config(overrides)
    layout = init_distributed(cfg.parallel, seed)
    dpo = cfg.finetune.objective in ("dpo", "reward", "classify")  # packed documents of their own kinds
    try:
        validate(cfg, world_size=layout.world)
        objective = objective_for(cfg, "finetune")
        engine = training_engine(cfg, layout, build_model(cfg, layout, VOCAB, packed or dpo, objective.num_labels()),
                                 objective)
        if cfg.finetune.lora:
            for name, param in engine.named_parameters():
                if name.endswith(".lora.b"):
                    shape = engine.whole_shape(param)
                    engine.scatter(param, "param", torch.randn(shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        grads = _GradCapture(engine.module)
        t = cfg.train
        gen = torch.Generator().manual_seed(seed)
        losses = []
        def micro_batches():
            tokens = torch.randint(0, LEARNABLE, (t.global_batch_size, t.seq_len + 1), generator=gen)
            batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
            from tests.helpers.batches import labelled_batch, preference_batch

            if cfg.finetune.objective == "classify":
                batch = labelled_batch(t.global_batch_size, t.seq_len, gen, cfg.finetune.num_labels)
            elif dpo:
                batch = preference_batch(t.global_batch_size, t.seq_len, gen,
                                         reference=cfg.finetune.objective == "dpo" and cfg.finetune.lora is None)
            if masked and not dpo:
                density = torch.linspace(0.05, 0.95, t.global_batch_size)[torch.randperm(t.global_batch_size, generator=gen)]
                mask = torch.rand(t.global_batch_size, t.seq_len, generator=gen) < density[:, None]
                mask[:, -1] = True  # at least one target each
                batch["loss_mask"] = mask
            if packed and not dpo:
                from scalelm.data.packing import document_positions

                for row in range(t.global_batch_size):  # 1 to 4 documents a window
                    cuts = torch.randperm(t.seq_len - 1, generator=gen)[: int(torch.randint(0, 4, (1,), generator=gen))] + 1
                    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([t.seq_len])]))
                    docs, positions = document_positions(lengths.numpy(), t.seq_len)
                    batch.setdefault("document_ids", torch.zeros(t.global_batch_size, t.seq_len, dtype=torch.int64))[row] = \
                        torch.from_numpy(docs)
                    batch.setdefault("position_ids", torch.zeros(t.global_batch_size, t.seq_len, dtype=torch.int64))[row] = \
                        torch.from_numpy(positions)
            share = {k: v.chunk(layout.data)[layout.dp_rank] for k, v in batch.items()}
            return [{k: v[i:i + t.micro_batch_size] for k, v in share.items()}
                    for i in range(0, len(share["input_ids"]), t.micro_batch_size)]

        for _ in range(steps):
            losses.append(step(engine, micro_batches()))
            grads.freeze()
        val = engine.evaluate(with_reference(engine, micro_batches()), engine.grad_accum)
        whole = grads.whole(layout)  # collective: every rank takes part
        weights = _whole_weights(engine, layout) if cfg.finetune.lora else None
        return {"losses": losses, "val": val.loss, "lr": engine.lr, "grads": whole if layout.rank == 0 else None,
                "metrics": {val.unit: val.units, **val.metrics}, "weights": weights if layout.rank == 0 else None}
    finally:
        parallel_state.destroy_model_parallel() if keep_group else destroy_distributed()


def _whole_weights(engine, layout) -> dict[str, torch.Tensor]:
    """Every whole weight of the model, frozen ones too, from every pipeline stage; collective."""
    mine = {name: engine.gather(param, "param").clone() for name, param in engine.named_parameters()}
    if layout.pipeline == 1:
        return mine
    stages = [None] * layout.pipeline
    torch.distributed.all_gather_object(stages, mine, group=parallel_state.get_pipeline_model_parallel_group())
    return {k: v for stage in stages for k, v in stage.items()}


class _GradCapture:
    """The accumulated gradient of every parameter as the first step leaves it (before ZeRO-2/3 would
    partition it: these tests capture under ZeRO-1)."""

    def __init__(self, module: torch.nn.Module):
        self.named = {name: p for name, p in canonical_parameters(module) if p.requires_grad}
        self.grads: dict[str, torch.Tensor] = {}
        self.frozen = False
        for name, param in self.named.items():
            param.register_post_accumulate_grad_hook(lambda p, name=name: self._keep(name, p))

    def _keep(self, name: str, param: torch.Tensor) -> None:
        if not self.frozen:
            self.grads[name] = param.grad.detach().clone()

    def freeze(self) -> None:
        self.frozen = True

    def whole(self, layout) -> dict[str, torch.Tensor]:
        """Gathered over tensor ranks and pipeline stages, named as the single-process GPT names them."""
        tp_group = parallel_state.get_tensor_model_parallel_group()
        for grad in self.grads.values():  # each data-parallel rank saw its share of the batch: average them
            torch.distributed.all_reduce(grad, group=parallel_state.get_data_parallel_group())
            grad /= layout.data
        mine = {n: gather_tensor_parallel(g, self.named[n], tp_group) for n, g in self.grads.items()}
        if layout.pipeline == 1:
            return mine
        stages = [None] * layout.pipeline
        torch.distributed.all_gather_object(stages, mine, group=parallel_state.get_pipeline_model_parallel_group())
        whole: dict[str, torch.Tensor] = {}
        for stage in stages:
            for key, grad in stage.items():
                # a tied embedding lives on the first and the last stage, each with its share of the
                # gradient; DeepSpeed sums the two before the step, and so does this
                whole[key] = whole[key] + grad if key in whole else grad
        return whole


def pretrain_run(overrides: list[str], stage: str = "pretrain") -> list[float]:
    """`scalelm pretrain` (or `finetune`) with these overrides; every step's loss in log.dir's metrics.jsonl after it."""
    import json
    from pathlib import Path

    from scalelm.train.finetune import load_finetune_config
    from scalelm.train.loop import train

    config = [o.removeprefix("--config=") for o in overrides if o.startswith("--config=")]
    load = load_config if stage == "pretrain" else load_finetune_config
    cfg = load(config[0] if config else None, [o for o in overrides if not o.startswith("--config=")])
    train(cfg, stage)
    records = (Path(cfg.log.dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in records if '"loss"' in line]


def full_disk_run(overrides: list[str], full_on: int, step: int) -> dict:
    """pretrain_run, but the disk is full for rank `full_on` when it writes step `step`'s checkpoint: the error every
    rank raised, and the last step it trained."""
    import json

    from scalelm.checkpoint import store
    from scalelm.errors import CheckpointError

    write = store.TensorWriter.write

    def disk_full(self, name, tensor):
        if f"step-{step:08d}" in str(self.path):
            raise OSError(28, "No space left on device", str(self.path))
        write(self, name, tensor)

    if int(os.environ["RANK"]) == full_on:
        store.TensorWriter.write = disk_full
    steps = []
    try:
        pretrain_run(overrides)
    except CheckpointError as e:
        log_dir = next(o.removeprefix("log.dir=") for o in overrides if o.startswith("log.dir="))
        if (Path(log_dir) / "metrics.jsonl").is_file():  # rank 0's
            steps = [json.loads(line)["step"] for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]
        return {"error": str(e), "steps": steps}
    return {"error": None, "steps": steps}


def straight_and_resumed(common: list[str], run: Path, steps: int) -> tuple[list[str], list[str]]:
    """Two runs of `steps` steps of `common` (whose log.dir is `run`), in sibling directories: `straight` through,
    saving a checkpoint halfway, and `resumed` from that checkpoint (in new processes, as after a crash). The
    second's losses must be the first's second half, bit for bit."""
    half = steps // 2
    moved = {name: [o.replace(str(run), str(run.with_name(name))) for o in common] for name in ("straight", "resumed")}
    midway = run.with_name("straight") / "checkpoints" / f"step-{half:08d}"
    return (moved["straight"] + [f"train.steps={steps}", f"checkpoint.every={half}"],
            moved["resumed"] + [f"train.steps={steps}", f"train.resume={midway}"])


def reshard(overrides: list[str], source: str, target: str) -> None:
    """Load checkpoint `source` into the layout `overrides` give, and save it again into `target`."""
    from pathlib import Path

    from scalelm.checkpoint.resume import find_checkpoint, load_checkpoint
    from scalelm.checkpoint.save import save_checkpoint
    from scalelm.data.files import sha256_file
    from scalelm.data.loader import loader_from_config
    from scalelm.data.tokenizer import resolve_vocab_size
    from scalelm.model.build import build_model
    from scalelm.train.sources import Loader

    cfg = load_config(None, overrides + [f"train.resume={source}", f"checkpoint.dir={target}"])
    cfg.model.vocab_size = resolve_vocab_size(cfg)
    layout = init_distributed(cfg.parallel, cfg.train.seed)
    try:
        engine = training_engine(cfg, layout, build_model(cfg, layout, cfg.model.vocab_size))
        source = Loader(loader_from_config(cfg, "train", layout.dp_rank, layout.data), engine.reads_data)
        ckpt, manifest, _ = find_checkpoint(cfg, layout)
        tokenizer = sha256_file(cfg.data.tokenizer)
        run, _ = load_checkpoint(cfg, layout, engine, source, ckpt, manifest, tokenizer)
        save_checkpoint(cfg, layout, engine, manifest["step"], run, source.state_dict(), tokenizer)
        assert Path(target).is_dir()
    finally:
        destroy_distributed()


def evaluate_run(checkpoint, sources: list[str], windows: int, overrides: list[str]):
    """`scalelm eval CKPT` in-framework on these ranks; the Perplexity on rank 0."""
    from scalelm.infer.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint, sources, "val", windows, overrides)


# The model peak_memory's callers measure: big enough that what the plan models (hundreds of MB a rank) dwarfs
# what it does not (Python's and the engines' own objects, a few tens of MB).
MEMORY_VOCAB = 8000
MEMORY_MODEL = ["model.num_layers=4", "model.hidden_size=512", "model.num_heads=8", "train.seq_len=128",
                "train.micro_batch_size=4", "train.global_batch_size=8", "train.precision=fp32"]


def peak_memory(runs: list[tuple[list[str], int]], vocab_size: int) -> list[dict]:
    """For each (overrides of the tiny config, steps) in turn, all for this world size: how many bytes this rank's
    memory rose above where it stood just before the engine was built, at the peak of building it and training
    that many steps (and of building it alone).

    The peak is the kernel's own high-water mark of the resident set (VmHWM), reset just before the engine is
    built: it is exact, where a sampling thread could miss the optimizer step's temporaries, which live for a
    few milliseconds. Two things are taken out that are not the training's memory. Pages of files (the shared
    libraries torch and DeepSpeed load on first use) are code, not tensors: their growth is subtracted. And
    glibc's mmap threshold is pinned at its default, 128 KiB: glibc otherwise raises it to the largest block
    freed so far (up to 32 MiB), after which freed tensors stay in its heap, counted as resident though nothing
    holds them (that is what made ZeRO-3 look as if it kept the whole model after partitioning it).

    The ranks keep one process group across the layouts: only megatron's groups are made anew for each."""
    import gc

    from megatron.core import parallel_state

    from scalelm.config import validate
    from scalelm.model.build import build_model

    pin_mmap_threshold()
    results = []
    try:
        for overrides, steps in runs:
            cfg = tiny_config(overrides)
            cfg.model.vocab_size = vocab_size
            layout = init_distributed(cfg.parallel, 0)
            validate(cfg, world_size=layout.world)
            t = cfg.train
            tokens = torch.randint(0, vocab_size, (steps * t.global_batch_size, t.seq_len + 1), generator=torch.Generator().manual_seed(0))
            batches = [{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in tokens.split(t.micro_batch_size)]
            gc.collect()
            before = memory_status()
            reset_peak()
            engine = training_engine(cfg, layout, build_model(cfg, layout, vocab_size))
            built = memory_status()
            reset_peak()
            for i in range(steps):
                step(engine, batches[i * engine.grad_accum:(i + 1) * engine.grad_accum])
            after = memory_status()
            # the peak of the build and the peak of the steps, each less the file pages grown by then
            peaks = [status["VmHWM"] - (status["RssFile"] - before["RssFile"]) for status in (built, after)]
            results.append({"grown": max(peaks) - before["VmRSS"], "built": peaks[0] - before["VmRSS"],
                            "files": after["RssFile"] - before["RssFile"]})
            del engine, batches
            gc.collect()
            parallel_state.destroy_model_parallel()
    finally:
        destroy_distributed()
    return results


def pin_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at its default, 128 KiB, so freed tensors go back to the kernel (see peak_memory)."""
    import ctypes

    M_MMAP_THRESHOLD = -3  # glibc's malloc.h
    if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024):
        raise RuntimeError("glibc refused to pin its mmap threshold")


def memory_status() -> dict[str, int]:
    """This process's memory figures from /proc/self/status, in bytes (VmRSS, VmHWM, RssFile, ...)."""
    with open("/proc/self/status") as f:
        fields = (line.split() for line in f if line.split()[-1:] == ["kB"])
        return {name.rstrip(":"): int(value) * 1024 for name, value, _ in fields}


def reset_peak() -> None:
    """Restart the kernel's high-water mark of the resident set (VmHWM) from the present (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


PACKED = (5, 7, 3)  # documents in one window of 16 tokens; the last token is padding


def packed_vs_alone(overrides: list[str], seed: int = 0) -> dict:
    """Each document's logits and loss in a packed window, and run alone (its own window, plain causal
    attention, positions from 0): the largest difference of each, on every rank."""
    from megatron.core import tensor_parallel

    from scalelm.data.packing import chat_window
    from scalelm.model.build import build_model

    cfg = tiny_config(overrides + ["train.seq_len=16"])
    layout = init_distributed(cfg.parallel, seed)
    try:
        model = build_model(cfg, layout, VOCAB, documents=True).eval()
        gen = torch.Generator().manual_seed(seed)
        docs = [torch.randint(4, LEARNABLE, (n,), generator=gen) for n in PACKED]
        tokens = torch.cat(docs).numpy()
        flags = torch.ones(tokens.size, dtype=torch.uint8).numpy()  # every next token a target
        window = {k: torch.from_numpy(v)[None] for k, v in
                  chat_window(tokens, flags, torch.tensor(PACKED).numpy(), cfg.train.seq_len, "assistant").items()}
        objective, whole = NextToken(), tensor_parallel.gather_from_tensor_model_parallel_region
        with torch.no_grad():
            packed = model(window["input_ids"], window["position_ids"], window["document_ids"])  # (s, 1, V/tp)
            packed_loss = objective(packed.clone(), window)[0].item() / objective.units(window)
            packed = whole(packed)[:, 0, :VOCAB]  # the padded vocabulary's logits are -inf
            logit_diff, start, loss_sum, units = 0.0, 0, 0.0, 0
            for doc in docs:
                alone = whole(model(doc[None]))[:, 0, :VOCAB]  # (n, V)
                logit_diff = max(logit_diff, (alone - packed[start:start + len(doc)]).abs().max().item())
                batch = {"labels": doc[None, 1:]}
                loss_sum += objective(model(doc[None, :-1]), batch)[0].item()
                units += objective.units(batch)
                start += len(doc)
        return {"logit_diff": logit_diff, "loss_diff": abs(packed_loss - loss_sum / units), "loss": packed_loss}
    finally:
        destroy_distributed()


def frozen_weight_round_trip(overrides: list[str], root: str) -> dict:
    """A model whose final norm is frozen (no LoRA) trains a step and saves; a model of another seed starts from
    that checkpoint (train.init_from). The frozen weight as saved and as loaded, and its manifest entry, on rank 0."""
    from scalelm.checkpoint import store
    from scalelm.checkpoint.resume import init_weights
    from scalelm.checkpoint.run_state import RunState
    from scalelm.checkpoint.save import save_checkpoint
    from scalelm.config import validate
    from scalelm.model.build import build_model

    cfg = tiny_config(overrides + [f"checkpoint.dir={root}"])
    layout = init_distributed(cfg.parallel, 0)
    try:
        validate(cfg, world_size=layout.world)

        def engine_of(seed: int) -> Engine:
            cfg.train.seed = seed
            model = build_model(cfg, layout, VOCAB)
            model.norm.norm.weight.requires_grad_(False)
            return training_engine(cfg, layout, model)

        engine, t = engine_of(0), cfg.train
        with torch.no_grad():  # a frozen weight that is not the initialisation's ones
            engine.scatter(dict(engine.named_parameters())["norm.norm.weight"], "param", torch.linspace(0.5, 1.5, 64))
        tokens = torch.randint(0, LEARNABLE, (t.global_batch_size // layout.data, t.seq_len + 1),
                               generator=torch.Generator().manual_seed(0))
        step(engine, [{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in tokens.split(t.micro_batch_size)])
        saved = engine.gather(dict(engine.named_parameters())["norm.norm.weight"], "param").clone()
        save_checkpoint(cfg, layout, engine, 1, RunState(step=1), None, None)
        cfg.train.init_from = root
        other = engine_of(1)
        init_weights(cfg, other, None)
        loaded = other.gather(dict(other.named_parameters())["norm.norm.weight"], "param")
        entry = store.read_manifest(store.resolve(Path(root)))["tensors"]["norm.norm.weight"]
        return {"saved": saved, "loaded": loaded, "entry": entry} if layout.rank == 0 else None
    finally:
        destroy_distributed()


def bidirectional(overrides: list[str], seed: int = 0) -> dict:
    """A model with model.causal=false on fixed tokens: its logits (b, s, V) on every rank, every whole weight on
    rank 0; and, built for packed documents (with `overrides`' train.packed_attention), each document of a packed
    window against itself alone in a window of its own: the largest difference of their logits."""
    from megatron.core import tensor_parallel

    from scalelm.data.packing import chat_window
    from scalelm.model.build import build_model

    cfg = tiny_config(["model.causal=false", *overrides])
    layout = init_distributed(cfg.parallel, seed)
    whole = tensor_parallel.gather_from_tensor_model_parallel_region
    try:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, LEARNABLE, (2, cfg.train.seq_len), generator=gen)
        with torch.no_grad():
            model = build_model(cfg, layout, VOCAB).eval()
            logits = whole(model(tokens))[..., :VOCAB].transpose(0, 1)  # (b, s, V)
            group = parallel_state.get_tensor_model_parallel_group()
            weights = {n: gather_tensor_parallel(p.detach(), p, group) for n, p in canonical_parameters(model)}
            packed_model = build_model(cfg, layout, VOCAB, documents=True).eval()
            docs = [torch.randint(4, LEARNABLE, (n,), generator=gen) for n in PACKED]
            window = {k: torch.from_numpy(v)[None] for k, v in chat_window(
                torch.cat(docs).numpy(), torch.ones(sum(PACKED), dtype=torch.uint8).numpy(), torch.tensor(PACKED).numpy(),
                cfg.train.seq_len, "assistant").items()}
            packed = whole(packed_model(window["input_ids"], window["position_ids"], window["document_ids"]))[:, 0, :VOCAB]
            start, packed_diff = 0, 0.0
            for doc in docs:  # alone: its own window, the rest of it padding of another document
                own = {k: torch.from_numpy(v)[None] for k, v in chat_window(
                    doc.numpy(), torch.ones(len(doc), dtype=torch.uint8).numpy(), torch.tensor([len(doc)]).numpy(),
                    cfg.train.seq_len, "assistant").items()}
                alone = whole(packed_model(own["input_ids"], own["position_ids"], own["document_ids"]))[:len(doc), 0, :VOCAB]
                packed_diff = max(packed_diff, (alone - packed[start:start + len(doc)]).abs().max().item())
                start += len(doc)
        return {"tokens": tokens, "logits": logits, "weights": weights if layout.rank == 0 else None,
                "packed_diff": packed_diff}
    finally:
        destroy_distributed()


def forward_outputs(overrides: list[str], seed: int = 0) -> dict:
    """engine.forward_only's every output (objectives.Output) of one micro-batch of fixed tokens, with the engine of
    a model without an optimizer: logits gathered over the vocabulary, per-token log-probs, hidden states. On the
    ranks that compute the loss (None elsewhere)."""
    from megatron.core import tensor_parallel

    from scalelm.model.build import build_model
    from scalelm.objectives import Output

    cfg = tiny_config(overrides)
    layout = init_distributed(cfg.parallel, seed)
    try:
        engine = Engine(cfg, layout, build_model(cfg, layout, VOCAB), NextToken())
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, LEARNABLE, (cfg.train.micro_batch_size, cfg.train.seq_len + 1), generator=gen)
        micro = [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}] if engine.reads_data else []
        out = {output.value: engine.forward_only(micro, 1, output) for output in Output if output is not Output.SCORES}
        if not engine.computes_loss:
            return None
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(out["logits"][0])
        return {"logits": logits[..., :VOCAB], "logprobs": out["logprobs"][0], "hidden": out["hidden"][0]}
    finally:
        destroy_distributed()
