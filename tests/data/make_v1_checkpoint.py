"""How tests/data/v1/ was made: a tiny run of scalelm at commit cac9950 (checkpoint format version 1, before the
objectives were a package), kept so that every later scalelm is tested against a checkpoint it did not write.

    python tests/data/make_v1_checkpoint.py tests/data/v1      # at commit cac9950, from the repository root

It writes, with relative paths (the run starts in the output folder, so the checkpoint names its shards
and tokenizer relative to it):
    corpus/, docs/        a small made-up corpus and its prepared documents (removed at the end: not needed)
    tok.model, tok.json   a 320-piece SentencePiece model
    shards/               text shards of it
    run/checkpoints/step-00000003/   the checkpoint after step 3 of 6 (fp32, dropout 0.1, one process)
    run/metrics.jsonl     the losses of all six steps: a resume from step 3 must give steps 4-6 bit for bit
Step 6's checkpoint is deleted, so the folder holds one checkpoint; the run's other files are left out.
"""

import os
import shutil
import sys
from pathlib import Path

RUN = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.dropout=0.1", "train.seq_len=32",
       "train.micro_batch_size=2", "train.global_batch_size=4", "train.precision=fp32", "train.steps=6",
       "train.eval_every=0", "data.num_workers=0", "optim.warmup_steps=2", "optim.lr=1e-2", "checkpoint.every=3",
       "checkpoint.keep=2", "log.every=1", "log.tensorboard=false", "data.train=shards", "data.tokenizer=tok.model",
       "log.dir=run"]


def make(out: Path) -> None:
    import torch
    from tests.corpus import write_corpus

    from scalelm.config import load_config
    from scalelm.data.prepare import prepare
    from scalelm.data.shards import write_shards
    from scalelm.data.tokenizer import train_tokenizer
    from scalelm.train.loop import pretrain

    torch.set_num_threads(1)
    os.chdir(out)
    write_corpus(Path("corpus"), n_docs=40)
    prepare([Path("corpus")], Path("docs"), workers=1, progress=False)
    train_tokenizer([Path("docs")], Path("tok.model"), vocab_size=320, workers=1)
    write_shards([Path("docs")], Path("tok.model"), Path("shards"), shard_size=64 << 10, val_fraction=0.1, workers=1,
                 progress=False)
    pretrain(load_config(None, RUN))
    shutil.rmtree("corpus")
    shutil.rmtree("docs")
    shutil.rmtree("run/checkpoints/step-00000006")
    (Path("run/checkpoints/latest")).write_text("step-00000003\n")
    for extra in ("run/config.yaml", "run/events.log"):
        Path(extra).unlink(missing_ok=True)


if __name__ == "__main__":
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=False)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.distributed.ranks import run_ranks

    run_ranks(1, make, out)
