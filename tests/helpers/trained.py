"""Two small models trained in two parallel layouts, for the conversion tests: a GPT-3-style one from
tensor 2 x pipeline 2 and a Llama-style one (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied
head, no biases) from ZeRO-3 over 2 data-parallel ranks."""

from pathlib import Path

from tests.helpers.ranks import run_ranks
from tests.helpers.workloads import pretrain_run

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "train.seq_len=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.precision=fp32", "train.eval_every=0", "data.num_workers=0", "train.steps=8",
        "optim.warmup_steps=1", "optim.lr=1e-2", "log.tensorboard=false"]
LLAMA = ["model.position_embedding=rope", "model.normalization=rmsnorm", "model.activation=swiglu", "model.bias=false",
         "model.num_kv_heads=2", "model.tie_embeddings=false"]
MODELS = {"gpt": (4, ["parallel.tensor=2", "parallel.pipeline=2"]), "llama": (2, ["parallel.zero_stage=3", *LLAMA])}


def train_models(pipeline: dict[str, Path], root: Path) -> dict[str, Path]:
    """{name: its checkpoint.dir}, each trained for a few steps at a high learning rate (weights far from init)."""
    out = {}
    for name, (world, layout) in MODELS.items():
        run_ranks(world, pretrain_run, [f"data.train={pipeline['shards']}", f"data.tokenizer={pipeline['tokenizer']}",
                                        f"log.dir={root / name}", *TINY, *layout])
        out[name] = root / name / "checkpoints"
    return out
