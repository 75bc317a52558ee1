"""Pretrain (or finetune, or generate) on a Ray cluster: every Ray Train worker is one scalelm rank.

    ray job submit --address http://HEAD:8265 -- \\
        python -m scalelm.launch.ray [finetune] --config CFG --workers N [--gpus-per-worker G] [key=value ...]
    ray job submit ... -- python -m scalelm.launch.ray generate --workers N CKPT --prompts /abs/p.jsonl --out /abs/o.jsonl

The config is read and checked here, in the job's driver, and handed to the workers as data, so only
the paths inside it (shards, tokenizer, checkpoint and log directories) must be reachable from every
node: give them as absolute paths on shared storage. Ray Train's TorchTrainer starts the workers and
their process group (NCCL on GPUs, gloo on CPUs); each worker runs the same `pretrain` (or, after the
word `finetune`, `finetune`) as torchrun and SLURM ranks. When a worker dies, Ray restarts the whole group (up to
--max-failures times) and the new workers resume from the newest checkpoint in checkpoint.dir (train.resume=auto).
After the word `generate`, the workers run `scalelm generate` on a checkpoint (its options follow the Ray ones; the
checkpoint, --prompts and --out given as absolute paths on shared storage); a failed worker ends the job.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from scalelm.config import Config, from_dict, load_config, to_dict
from scalelm.errors import ConfigError, ScalelmError, TrainingError
from scalelm.quiet import quiet_engines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scalelm.launch.ray [finetune]",
                                description="Pretrain, or after the word finetune finetune, on Ray Train workers.")
    p.add_argument("--config", required=True, help="YAML config (read by this driver; the workers get it as data)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")
    p.add_argument("--max-failures", type=int, default=3,
                   help="times Ray restarts the workers after one dies; each restart resumes from the newest checkpoint")
    return _worker_options(p)


def parsed(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """argv parsed, key=value overrides taken after options too (argparse takes positionals only before them)."""
    args, extra = parser.parse_known_args(argv)
    if any("=" not in e or e.startswith("-") for e in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides += extra
    return args


def _worker_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--workers", type=int, required=True, help="ranks in all: tensor x pipeline x data parallel")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs each worker reserves (default: 1 when the cluster has GPUs, else 0: run on CPUs)")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs each worker reserves (default 1)")
    p.add_argument("--placement", choices=["pack", "spread"], default="pack",
                   help="pack workers onto as few nodes as possible (default; keeps tensor-parallel peers together) "
                        "or spread them")
    p.add_argument("--address", default=None, help="Ray cluster address (default: the job's cluster, or RAY_ADDRESS)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = argv.pop(0) if argv[:1] in (["pretrain"], ["finetune"], ["generate"]) else "pretrain"
    if stage == "generate":
        return generate(argv)
    args = parsed(parser, argv)
    if args.workers < 1 or args.max_failures < 0:
        parser.error("--workers must be 1 or more and --max-failures 0 or more")
    quiet_engines()
    try:
        if stage == "finetune":
            from scalelm.train.finetune import load_finetune_config

            cfg = load_finetune_config(args.config, args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        check_paths(cfg)
        run(cfg, args, stage)
    except ScalelmError as e:
        print(f"scalelm: error: {e}", file=sys.stderr)
        return 2
    from scalelm.train.log import read_records  # after quiet_engines: it imports the engines
    from scalelm.train.records import loss_text

    last = next((r for r in reversed(read_records(cfg.log.dir)) if "loss" in r), None)  # rank 0's, on shared storage
    print(f"done: step {last['step']}, loss {loss_text(last['loss'])} -> {cfg.log.dir}/" if last else f"done -> {cfg.log.dir}/")
    return 0


def run(cfg: Config, args: argparse.Namespace, stage: str = "pretrain") -> None:
    """Train on `args.workers` Ray Train workers; TrainingError when Ray gives up on them."""
    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from scalelm.train.preflight import preflight

    preflight(cfg, stage, args.workers)  # the config, the data and the checkpoints, before any worker starts
    ray.init(address=args.address, log_to_driver=True)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "stage": stage},
        scaling_config=scaling(args),
        run_config=RunConfig(name="ray", storage_path=str(Path(cfg.log.dir).resolve()),
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        newest = sorted(Path(cfg.checkpoint.dir).glob("step-*"))
        raise TrainingError(f"the workers failed and Ray gave up after {args.max_failures} restart(s): "
                            f"{str(e).splitlines()[0]}; newest checkpoint: {newest[-1] if newest else 'none'}") from None


def scaling(args: argparse.Namespace):
    """Ray Train's ScalingConfig of the launch: --workers, each with its CPUs and GPUs (by default one when the
    cluster has GPUs), packed or spread. Call after ray.init."""
    import ray
    from ray.train import ScalingConfig

    gpus = args.gpus_per_worker
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return ScalingConfig(num_workers=args.workers, use_gpu=gpus > 0,
                         resources_per_worker={"CPU": args.cpus_per_worker, **({"GPU": gpus} if gpus else {})},
                         placement_strategy=args.placement.upper())


def generate_parser() -> argparse.ArgumentParser:
    from scalelm.infer.generate import add_arguments

    p = _worker_options(argparse.ArgumentParser(prog="python -m scalelm.launch.ray generate",
                                                description="scalelm generate on Ray Train workers."))
    add_arguments(p)
    return p


def generate(argv: list[str]) -> int:
    """`python -m scalelm.launch.ray generate --workers N [Ray options] CKPT [scalelm generate's options]`: the
    checkpoint sampled on N workers (scalelm generate's layout: parallel.* overrides); worker 0 writes --out."""
    quiet_engines(hf=True)
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from scalelm.infer.generate import check

    args = parsed(generate_parser(), argv)
    if args.workers < 1:
        generate_parser().error("--workers must be 1 or more")
    try:
        for flag, path in (("MODEL", args.model), ("--prompts", args.prompts), ("--out", args.out)):
            if path is not None and not path.is_absolute():
                raise ConfigError(f"{flag} {path} is a relative path: Ray workers do not run in this directory; give an "
                                  f"absolute path on storage every node can read")
        check(args, args.workers)  # what the workers would refuse, refused here, once
    except ScalelmError as e:
        print(f"scalelm: error: {e}", file=sys.stderr)
        return 2
    ray.init(address=args.address, log_to_driver=True)
    trainer = TorchTrainer(generate_worker, train_loop_config={"argv": argv}, scaling_config=scaling(args),
                           run_config=RunConfig(name="ray-generate"))
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        print(f"scalelm: error: the workers failed: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


def generate_worker(loop_config: dict) -> None:
    """One rank of `generate`, on a Ray Train worker."""
    quiet_engines(hf=True)
    from scalelm.infer.generate import run

    run(parsed(generate_parser(), loop_config["argv"]))


def train_worker(loop_config: dict) -> None:
    """One rank, on a Ray Train worker (which has set RANK, WORLD_SIZE, LOCAL_RANK and the process group)."""
    import ray

    quiet_engines()
    from scalelm.data.workers import preload_workers
    from scalelm.train.loop import train

    preload_workers()  # this worker's data loader workers start from a forkserver that has imported the readers

    # the job's restarted workers are the same job: a hold on checkpoint.dir left by a lost one is theirs to take
    os.environ["SCALELM_JOB_ID"] = f"Ray job {ray.get_runtime_context().get_job_id()}"

    train(from_dict(loop_config["config"]), loop_config.get("stage", "pretrain"))


def check_paths(cfg: Config) -> None:
    """Workers run in their own directories on other nodes: every path in the config must be absolute."""
    paths = {"data.train": cfg.data.train, "data.val": cfg.data.val, "data.tokenizer": [cfg.data.tokenizer],
             "log.dir": [cfg.log.dir], "checkpoint.dir": [cfg.checkpoint.dir], "train.init_from": [cfg.train.init_from],
             "train.resume": [cfg.train.resume if cfg.train.resume not in ("auto", "none") else None]}
    for key, values in paths.items():
        for value in values:
            if value and "://" not in value and not value.startswith("pipe:") and not Path(value).is_absolute():
                raise ConfigError(f"{key}={value} is a relative path: Ray workers do not run in this directory; "
                                  f"give an absolute path on storage every node can read")


if __name__ == "__main__":
    sys.exit(main())
