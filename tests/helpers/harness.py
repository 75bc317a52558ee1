"""A scalelm checkpoint as an lm-eval model on one process, for tests/infer/test_harness.py."""

from pathlib import Path


def scalelm_lm(checkpoints: Path, layout):
    """The checkpoint's model in an engine on `layout` (single_process()'s), as lm-eval's model."""
    from scalelm.checkpoint import store
    from scalelm.checkpoint.resume import init_weights
    from scalelm.config import load_config
    from scalelm.convert.source import checkpoint_tokenizer
    from scalelm.data.tokenizer import load_tokenizer
    from scalelm.infer.harness import ScalelmLM
    from scalelm.model.build import build_model
    from scalelm.objectives.next_token import NextToken
    from scalelm.parallel.engine import Engine

    ckpt = store.resolve(checkpoints)
    manifest = store.read_manifest(ckpt)
    cfg = load_config(None, [f"train.init_from={ckpt}", "train.micro_batch_size=4", "train.global_batch_size=4"],
                      base={**manifest["config"], "parallel": {}})
    engine = Engine(cfg, layout, build_model(cfg, layout, cfg.model.vocab_size), NextToken(cfg))
    init_weights(cfg, engine, manifest.get("tokenizer_sha256"))
    sp = load_tokenizer(checkpoint_tokenizer(ckpt, manifest))
    return ScalelmLM(engine, sp, cfg.model.max_position_embeddings, batch_size=4)
