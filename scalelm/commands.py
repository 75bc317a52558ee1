"""What each `scalelm` command does: parse nothing (cli.py does), call into scalelm.*, print what a person
needs to read. Errors meant for people are raised as ScalelmError and printed by cli.main."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from scalelm.errors import ConfigError, ScalelmError
from scalelm.quiet import quiet_engines

# --demo-NAME: (the function of data/demo_sets.py, the count it reports, the file it writes)
DEMO_SETS = {"chat": ("demo_conversations", "conversations", "conversations.jsonl"),
             "pairs": ("demo_pairs", "pairs", "pairs.jsonl"),
             "labels": ("demo_passages", "texts", "texts.jsonl"),
             "prompts": ("demo_prompts", "prompts", "prompts.jsonl")}


def prepare(args: argparse.Namespace) -> None:
    from scalelm.data.prepare import prepare

    demo_set = next((name for name in DEMO_SETS if getattr(args, f"demo_{name}")), None)
    if demo_set:
        from scalelm.data import demo_sets
        from scalelm.data.demo import fetch_demo_corpus

        make, what, file = DEMO_SETS[demo_set]
        counts = getattr(demo_sets, make)(fetch_demo_corpus(), args.out)
        print(f"{counts[what]:,} {what} from {counts['plays']} plays -> {args.out / file}")
        return
    if args.demo == bool(args.inputs):
        raise ScalelmError("give INPUT files or directories, or --demo for the demo corpus (not both)")
    inputs = args.inputs
    if args.demo:
        from scalelm.data.demo import fetch_demo_corpus

        inputs = [fetch_demo_corpus()]
    report = prepare(inputs, args.out, min_chars=args.min_chars, dedup=args.dedup, near_threshold=args.near_threshold,
                     text_field=args.text_field, workers=args.workers, overwrite=args.overwrite)
    docs, dropped = report["documents"], report["documents"]["dropped"]
    print(f"kept {docs['kept']} of {docs['read']} documents ({dropped['too_short']} too short, "
          f"{dropped['exact_duplicate']} exact and {dropped['near_duplicate']} near duplicates; "
          f"{report['non_utf8']['documents']} with non-UTF-8 bytes replaced) -> {args.out}/ (report.json)")


def tokenizer_train(args: argparse.Namespace) -> None:
    from scalelm.data.tokenizer import meta_path, train_tokenizer

    meta = train_tokenizer(args.inputs, args.out, args.vocab_size, model_type=args.model_type, seed=args.seed,
                           max_sentences=args.max_sentences, workers=args.workers, overwrite=args.overwrite)
    print(f"{meta['model_type']} tokenizer, {meta['vocab_size']} pieces, from {meta['lines_read']:,} lines of text "
          f"-> {args.out} (sha256 {meta['sha256'][:12]}…; details in {meta_path(args.out)})")


def shard(args: argparse.Namespace) -> None:
    from scalelm.data.shards import parse_size, write_shards

    if args.chat:
        return _shard_chat(args)
    if args.preference:
        return _shard_preference(args)
    if args.labels:
        return _shard_labelled(args)
    if args.prompts:
        return _shard_prompts(args)
    started = time.perf_counter()
    m = write_shards(args.inputs, args.tokenizer, args.out, shard_size=parse_size(args.shard_size),
                     val_fraction=args.val_fraction, workers=args.workers, overwrite=args.overwrite)
    splits = m["splits"]
    print(f"{splits['train']['tokens']:,} train tokens in {len(splits['train']['shards'])} shards, "
          f"{splits['val']['tokens']:,} val tokens in {len(splits['val']['shards'])} ({m['dtype']}) "
          f"in {time.perf_counter() - started:.1f}s -> {args.out}/")
    if splits["val"]["tokens"] == 0 and args.val_fraction > 0:
        print(f"note: no document fell in the val split; raise --val-fraction (now {args.val_fraction})")


def _shard_chat(args: argparse.Namespace) -> None:
    from scalelm.data.chat_shards import write_chat_shards
    from scalelm.data.shards import parse_size

    started = time.perf_counter()
    m = write_chat_shards(args.inputs, args.tokenizer, args.out, seq_len=args.seq_len, overlong=args.overlong,
                          shard_size=parse_size(args.shard_size), val_fraction=args.val_fraction, workers=args.workers,
                          overwrite=args.overwrite)
    for split, s in m["splits"].items():
        print(f"{split}: {s['conversations']:,} conversations, {s['tokens']:,} tokens ({s['targets']['assistant']:,} "
              f"assistant targets) in {len(s['shards'])} shards; {s['truncated']:,} cut between turns and "
              f"{s['dropped_overlong']:,} dropped as longer than --seq-len {args.seq_len}")
    print(f"-> {args.out}/ in {time.perf_counter() - started:.1f}s")


def _shard_labelled(args: argparse.Namespace) -> None:
    from scalelm.data.labelled_shards import write_labelled_shards
    from scalelm.data.shards import parse_size

    started = time.perf_counter()
    m = write_labelled_shards(args.inputs, args.tokenizer, args.out, seq_len=args.seq_len,
                              shard_size=parse_size(args.shard_size), val_fraction=args.val_fraction, overwrite=args.overwrite)
    names = m["chat"]["labels"]
    for split, s in m["splits"].items():
        classes = ", ".join(f"{name} {n:,}" for name, n in zip(names, s["per_class"]))
        print(f"{split}: {s['texts']:,} texts, {s['tokens']:,} tokens in {len(s['shards'])} shards ({classes}); "
              f"{s['truncated']:,} cut to --seq-len {args.seq_len}")
    print(f"{len(names)} classes -> {args.out}/ in {time.perf_counter() - started:.1f}s")


def _shard_prompts(args: argparse.Namespace) -> None:
    from scalelm.data.prompt_shards import write_prompt_shards
    from scalelm.data.shards import parse_size

    started = time.perf_counter()
    m = write_prompt_shards(args.inputs, args.tokenizer, args.out, shard_size=parse_size(args.shard_size),
                            val_fraction=args.val_fraction, overwrite=args.overwrite)
    for split, s in m["splits"].items():
        print(f"{split}: {s['prompts']:,} prompts ({s['with_answer']:,} with answers), the longest {s['longest']:,} "
              f"tokens; {s['tokens']:,} tokens in {len(s['shards'])} shards")
    print(f"-> {args.out}/ in {time.perf_counter() - started:.1f}s")


def _shard_preference(args: argparse.Namespace) -> None:
    from scalelm.data.preference_shards import write_preference_shards
    from scalelm.data.shards import parse_size

    started = time.perf_counter()
    m = write_preference_shards(args.inputs, args.tokenizer, args.out, seq_len=args.seq_len,
                                shard_size=parse_size(args.shard_size), val_fraction=args.val_fraction,
                                workers=args.workers, overwrite=args.overwrite)
    for split, s in m["splits"].items():
        print(f"{split}: {s['pairs']:,} pairs, {s['tokens']:,} tokens ({s['targets']['assistant']:,} reply targets) in "
              f"{len(s['shards'])} shards; dropped {s['dropped_empty']:,} with an empty reply, {s['dropped_identical']:,} "
              f"with identical replies, {s['dropped_overlong']:,} longer than --seq-len {args.seq_len}")
    print(f"-> {args.out}/ in {time.perf_counter() - started:.1f}s")


def inspect(args: argparse.Namespace) -> None:
    from scalelm.data.inspect import inspect_shards

    for line in inspect_shards(args.shards, verify=args.verify, tokenizer=args.tokenizer):
        print(line)


def pretrain(args: argparse.Namespace) -> int:
    quiet_engines()
    from scalelm.config import load_config

    return _train(args, "pretrain", load_config)


def finetune(args: argparse.Namespace) -> int:
    quiet_engines()
    from scalelm.train.finetune import load_finetune_config

    return _train(args, "finetune", load_finetune_config)


def _train(args: argparse.Namespace, stage: str, load) -> int:
    cfg = load(args.config, args.overrides)  # config errors stop here, before any rank starts
    if args.preflight is not None or args.nproc_per_node > 1:
        from scalelm.train.preflight import preflight

        preflight(cfg, stage, world=args.preflight or args.nproc_per_node)  # the data and checkpoints too
        if args.preflight is not None:
            return 0
        from scalelm.launch.torchrun import relaunch

        return relaunch(args.nproc_per_node, [stage, "--config", args.config, *args.overrides])
    from scalelm.train.loop import train
    from scalelm.train.records import loss_text

    last = train(cfg, stage)
    if last and "loss" in last:
        print(f"done: step {last['step']}, loss {loss_text(last['loss'])}"
              + (f", val loss {last['val_loss']:.4f}" if "val_loss" in last else "") + f" -> {cfg.log.dir}/")
    elif last:
        print(f"nothing to do: the newest checkpoint is at step {last['step']}, train.steps={cfg.train.steps}")
    return 0


def score(args: argparse.Namespace) -> int:
    quiet_engines()
    from scalelm.train.finetune import load_finetune_config
    from scalelm.train.score import score_command

    cfg = load_finetune_config(args.config, args.overrides)
    if args.nproc_per_node > 1:
        from scalelm.launch.torchrun import relaunch

        return relaunch(args.nproc_per_node, ["score", "--config", args.config, *args.overrides]
                        + (["--overwrite"] if args.overwrite else []))
    score_command(cfg, args.overwrite)
    return 0


def consolidate(args: argparse.Namespace) -> None:
    quiet_engines()
    from scalelm.convert.consolidate import consolidate

    done = consolidate(args.checkpoint, args.out, verify=not args.no_verify, base=args.base)
    print(f"{done['tensors']} tensors, {done['parameters']:,} parameters from {done['checkpoint']} (step {done['step']}) "
          f"-> {args.out} ({done['bytes'] / 1e6:.1f} MB)")


def _print_report(report: dict, out: Path) -> None:
    from scalelm.convert.parity import describe

    print(f"{report['source']} -> {out}" + (f" ({report['layout']} layout)" if "layout" in report else ""))
    if "config" in report:
        print(f"continue training it with: scalelm pretrain --config {report['config']} data.train=SHARDS")
    if not report.get("tokenizer", True):
        print("no tokenizer went with it: pass --tokenizer PATH to include one")
    print(describe(report["parity"]) if "parity" in report else "parity: not checked (--no-verify)")


def to_hf(args: argparse.Namespace) -> None:
    quiet_engines(hf=True)
    from scalelm.convert.hf import to_hf

    _print_report(to_hf(args.checkpoint, args.out, args.tokenizer, verify=not args.no_verify, base=args.base), args.out)


def from_hf(args: argparse.Namespace) -> None:
    quiet_engines(hf=True)
    from scalelm.convert.hf import from_hf

    _print_report(from_hf(args.hf_dir, args.out, verify=not args.no_verify), args.out)


def to_gguf(args: argparse.Namespace) -> None:
    quiet_engines(hf=True)
    from scalelm.convert.gguf import to_gguf

    if args.adapter:
        from scalelm.convert.gguf_lora import to_gguf_lora

        report = to_gguf_lora(args.checkpoint, args.out, args.dtype or "f32", args.base, args.tokenizer,
                              verify=not args.no_verify)
        report["source"] += (f" (a {report['architecture']} LoRA adapter, rank {report['rank']}, {report['dtype']}, "
                             f"{report['bytes'] / 1e6:.1f} MB; load it with --lora beside the base's GGUF)")
    else:
        report = to_gguf(args.checkpoint, args.out, args.dtype or "f16", args.tokenizer, verify=not args.no_verify,
                         base=args.base)
        report["source"] += f" ({report['architecture']}, {report['dtype']}, {report['bytes'] / 1e6:.1f} MB)"
    _print_report(report, args.out)


def to_peft(args: argparse.Namespace) -> None:
    quiet_engines(hf=True)
    from scalelm.convert.peft import to_peft

    report = to_peft(args.checkpoint, args.out, args.base, args.tokenizer, verify=not args.no_verify)
    report["source"] += f" (adapters on {', '.join(report['targets'])}; the base's Hugging Face folder in {args.out / 'base'})"
    _print_report(report, args.out)


def generate(args: argparse.Namespace) -> int:
    quiet_engines(hf=True)
    from scalelm.infer.generate import check, run, sampling_of

    sampling = sampling_of(args)
    if args.chat is False and args.system:
        raise ConfigError("--system goes with --chat")
    if not args.model.exists():
        raise ConfigError(f"{args.model} does not exist: give a checkpoint or a Hugging Face folder")
    hf_folder = (args.model / "config.json").is_file()
    if args.base and hf_folder:
        raise ConfigError("--base goes with a LoRA checkpoint, and MODEL is a Hugging Face folder")
    if (args.backend or ("hf" if hf_folder else "scalelm")) == "hf":
        return _generate_hf(args, sampling)
    if hf_folder:
        raise ConfigError(f"{args.model} is a Hugging Face folder, which scalelm's decoder does not read: use --backend hf")
    if args.preflight is not None or args.nproc_per_node > 1:
        check(args, args.preflight or args.nproc_per_node)  # slurm/pretrain.sh runs --preflight before srun
        if args.preflight is not None:
            return 0
        from scalelm.launch.torchrun import relaunch

        return relaunch(args.nproc_per_node, [*args.argv, "--nproc-per-node", "1"])  # each rank: the last one counts
    return run(args)


def _generate_hf(args: argparse.Namespace, sampling) -> int:
    """`--backend hf`, or a Hugging Face folder: one prompt, streamed to the terminal by transformers."""
    from scalelm.infer.generate_hf import generate

    unused = [flag for flag, used in (("--prompts", args.prompts), ("--out", args.out), ("--stop", args.stop),
                                      ("--num-samples", args.num_samples > 1), ("--nproc-per-node", args.nproc_per_node > 1),
                                      ("key=value", args.overrides), ("--tokenizer", args.tokenizer),
                                      ("--preflight", args.preflight is not None)) if used]
    if unused:
        raise ConfigError(f"{', '.join(unused)}: scalelm's decoder only (a checkpoint, without --backend hf)")
    generate(args.model, args.prompt, sampling, chat=args.chat, system=args.system, base=args.base)
    print()
    return 0


def evaluate(args: argparse.Namespace) -> int:
    quiet_engines(hf=True)
    from scalelm.infer.evaluate import evaluate_checkpoint, evaluate_hf

    if not args.model.exists():
        raise ConfigError(f"{args.model} does not exist: give a checkpoint or a Hugging Face folder")
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--windows", args.windows)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}={value}: use 1 or more")
    if (args.model / "config.json").is_file():
        if args.overrides or args.nproc_per_node > 1 or args.base:
            raise ConfigError("a Hugging Face folder runs in this process with transformers: drop --nproc-per-node, "
                              "--base and key=value")
        result = evaluate_hf(args.model, args.data, args.split, args.seq_len, args.batch_size or 4, args.windows)
        print(result.line(args.split))
        return 0
    overrides = (list(args.overrides) + ([f"train.micro_batch_size={args.batch_size}"] if args.batch_size else [])
                 + ([f"train.seq_len={args.seq_len}"] if args.seq_len else []))
    if args.nproc_per_node > 1:
        from scalelm.launch.torchrun import relaunch

        forward = (["--data", *args.data, "--split", args.split] + (["--windows", str(args.windows)] if args.windows else [])
                   + (["--base", str(args.base)] if args.base else []))
        return relaunch(args.nproc_per_node, ["eval", str(args.model), *forward, *overrides])
    result = evaluate_checkpoint(args.model, args.data, args.split, args.windows, overrides, args.base)
    if result:
        print(result.line(args.split))
    return 0


def plan(args: argparse.Namespace) -> int:
    quiet_engines()
    from scalelm.config import load_config
    from scalelm.parallel.plan import GPUS, plan
    from scalelm.parallel.plan_report import describe, layouts_that_fit

    if args.nodes < 1 or args.gpus_per_node < 1 or not 0 < args.mfu <= 1:
        raise ConfigError("--nodes and --gpus-per-node must be 1 or more, --mfu in (0, 1]")
    cfg = load_config(args.config, args.overrides, check=False)
    if cfg.train.init_from and Path(cfg.train.init_from).exists():  # a finetuning config: the model is the start's
        from scalelm.train.finetune import load_finetune_config

        cfg = load_finetune_config(args.config, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size is None:
        if cfg.data.tokenizer:
            from scalelm.data.tokenizer import resolve_vocab_size

            cfg.model.vocab_size = resolve_vocab_size(cfg)
        else:
            cfg.model.vocab_size = args.vocab_size
    world, gpu_bytes = args.nodes * args.gpus_per_node, GPUS[args.gpu][0]
    try:
        result = plan(cfg, world)
    except ConfigError as e:
        print(f"this layout does not run on {world} GPUs: {e}")
        result = None
    else:
        print("\n".join(describe(result, args.nodes, args.gpus_per_node, args.gpu, args.mfu)))
        if result.fits(gpu_bytes):
            return 0
    fitting = layouts_that_fit(cfg, world, args.gpus_per_node, gpu_bytes)
    if not fitting:
        print("no layout of this model fits these GPUs at this batch shape: use more GPUs, or a smaller "
              "train.micro_batch_size or model")
    else:
        print("layouts that fit (cheapest first):")
        for overrides, other in fitting:
            print(f"  {overrides}   # {other.memory.total / 2**30:.1f} GiB per GPU")
    return 1


def plot(args: argparse.Namespace) -> None:
    from scalelm.train.plot import plot_run

    print(f"-> {plot_run(args.run_dir, args.out)}")


def config(args: argparse.Namespace) -> None:
    quiet_engines()
    import yaml

    from scalelm import objectives
    from scalelm.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    objectives.check(cfg, "finetune" if cfg.train.init_from else "pretrain")  # a config that starts from a model
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
