import sys, warnings; warnings.filterwarnings("ignore")
sys.path.insert(0, "/work/main")
from tests.distributed.ranks import run_ranks
from tests.distributed.workloads import peak_memory, tiny_config
from scalelm.parallel.plan import plan
BIG = ["model.num_layers=4", "model.hidden_size=512", "model.num_heads=8", "train.seq_len=128", "train.micro_batch_size=4",
       "train.global_batch_size=8", "train.precision=fp32"]
if __name__ == "__main__":
    for world, extra in [(1, []), (2, ["parallel.zero_stage=2"]), (2, ["parallel.zero_stage=3"]), (2, ["parallel.tensor=2"]), (2, ["parallel.pipeline=2"])]:
        ov = BIG + extra
        got = run_ranks(world, peak_memory, ov, 8000)
        cfg = tiny_config(ov); cfg.model.vocab_size = 8000
        p = plan(cfg, world)
        print(extra, [{k: round(v/1e6) for k, v in g.items()} for g in got], "plan", round(p.memory.total/1e6), {k: round(v/1e6) for k, v in vars(p.memory).items()}, flush=True)
