"""`scalelm finetune` end to end: chat SFT of a pretrained checkpoint on chat shards, on one process and
two ranks, resumed bit for bit, evaluated on assistant tokens in-framework and in transformers alike,
and refusing what does not fit."""

import json
import random
import subprocess
import sys

import pytest

from scalelm.checkpoint import store
from scalelm.config import load_config
from scalelm.convert.hf import from_hf, to_hf
from scalelm.data.chat_shards import write_chat_shards
from scalelm.errors import CheckpointError, ConfigError, DataError
from scalelm.infer.evaluate import evaluate_checkpoint, evaluate_hf
from scalelm.train.finetune import load_finetune_config
from scalelm.train.loop import pretrain, train
from tests.helpers.corpus import write_conversations
from tests.helpers.launched import SFT_MODEL as MODEL
from tests.helpers.launched import SFT_RUN as RUN
from tests.helpers.ranks import run_ranks
from tests.helpers.workloads import pretrain_run, straight_and_resumed


@pytest.fixture(scope="module")
def start(sft_start):
    return sft_start


def sft(chat, start, run, *extra: str) -> list[str]:
    return [f"data.train={chat['shards']}", f"train.init_from={start}", f"log.dir={run}", "train.eval_every=3",
            "train.eval_iters=2", *RUN, *extra]


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_finetune_trains_on_targets_and_validates_on_them(chat, start, tmp_path):
    cfg = load_finetune_config(None, sft(chat, start, tmp_path / "run", "train.steps=6"))
    assert cfg.model.num_layers == 2 and cfg.data.tokenizer  # the model and tokenizer come from the start
    last = train(cfg, "finetune")
    steps = [r for r in records(tmp_path / "run") if "loss" in r]
    assert len(steps) == 6 and steps[-1]["loss"] < steps[0]["loss"]
    assert all(0 < r["targets"] < 4 * 128 for r in steps)  # the loss is over target tokens, not the windows
    events = (tmp_path / "run" / "events.log").read_text()
    assert last["val_loss"] > 0 and "started from the weights of" in events
    assert "conversations into" in events and "% real tokens" in events


@pytest.mark.parametrize("world, layout", [(1, []), (2, ["parallel.zero_stage=1"])], ids=["single", "dp2"])
def test_finetune_resumes_bit_exact(chat, start, tmp_path, world, layout):
    common = sft(chat, start, tmp_path / "x", *layout, "model.dropout=0.1", "train.eval_every=0", "optim.decay_steps=6")
    straight, resumed = straight_and_resumed(common, tmp_path / "x", 6)
    losses = [run_ranks(world, pretrain_run, leg, "finetune")[0] for leg in (straight, resumed)]
    assert len(losses[1]) == 3 and losses[1] == losses[0][3:]  # every bit of every step's loss
    if world > 1:  # and its checkpoint goes on in another layout, the loader continuing at the share it had read
        (resharded,) = run_ranks(1, pretrain_run, resumed[:-2] + ["train.steps=7"], "finetune")
        assert len(resharded) == 4 and resharded[:3] == losses[0][3:]
        events = (tmp_path / "resumed" / "events.log").read_text()
        assert "layout changed (tensor x pipeline x data 1x1x2 -> 1x1x1)" in events and "the loader continues" in events


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalelm", *args], capture_output=True, text=True, timeout=600)


def test_two_ranks_and_eval_on_assistant_tokens_agree_with_transformers(chat, start, tmp_path):
    run = tmp_path / "run"
    done = run_cli("finetune", "--config", "configs/sft-tiny.yaml", "--nproc-per-node", "2",
                   *sft(chat, start, run, "train.steps=4", "train.eval_every=0"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: step 4") == 1
    # in process from here: the eval and convert commands run through the CLI in test_convert.py and test_classify.py
    ours = evaluate_checkpoint(run / "checkpoints", [str(chat["shards"])], "val", 8)
    to_hf(run / "checkpoints", tmp_path / "hf")
    theirs = evaluate_hf(tmp_path / "hf", [str(chat["shards"])], "val", 128, 4, 8)
    assert ours.targets is not None and ours.targets == theirs.targets  # the same target tokens
    assert abs(ours.loss - theirs.loss) < 1e-3  # packed in scalelm, one conversation at a time in transformers
    assert 0 < ours.accuracy < 1 and abs(ours.accuracy - theirs.accuracy) <= 0.005
    # a Hugging Face folder is a start too, through `convert from-hf` (its model and tokenizer come with it)
    from_hf(tmp_path / "hf", tmp_path / "from-hf")
    cfg = load_finetune_config(None, sft(chat, tmp_path / "from-hf", tmp_path / "again", "train.steps=1",
                                         "train.eval_every=0"))
    assert cfg.data.tokenizer == str(tmp_path / "from-hf" / "tokenizer.model")
    assert train(cfg, "finetune")["loss"] > 0


def test_what_does_not_fit_is_refused(chat, pipeline, start, tmp_path):
    with pytest.raises(ConfigError, match="scalelm finetune starts from a model: set train.init_from"):
        load_finetune_config(None, [f"data.train={chat['shards']}"])
    with pytest.raises(DataError, match="holds text shards, and finetune.objective=sft trains on chat shards .*; to continue pretraining"):
        train(load_finetune_config(None, sft(chat, start, tmp_path / "a", f"data.train={pipeline['shards']}")), "finetune")
    with pytest.raises(DataError, match="holds chat shards .*: finetune on them with `scalelm finetune`"):
        pretrain(load_config(None, [f"data.train={chat['shards']}", f"data.tokenizer={pipeline['tokenizer']}",
                                    f"log.dir={tmp_path / 'b'}", *MODEL, *RUN]))
    with pytest.raises(CheckpointError, match=r"holds another model \(model.num_layers=2 there, 3 here\)"):
        train(load_finetune_config(None, sft(chat, start, tmp_path / "c", "model.num_layers=3", "train.steps=1")),
              "finetune")
    other = tmp_path / "other-tokenizer"
    from scalelm.data.tokenizer import train_tokenizer

    train_tokenizer([pipeline["docs"]], other / "tok.model", vocab_size=420, workers=1)
    write_chat_shards([write_conversations(tmp_path / "raw", n=20)], other / "tok.model", other / "shards",
                      seq_len=128, workers=1, progress=False)
    with pytest.raises(DataError, match="was made with another tokenizer"):
        train(load_finetune_config(None, sft(chat, start, tmp_path / "d", f"data.train={other / 'shards'}")), "finetune")
    assert not store.committed(tmp_path / "c" / "checkpoints")


def test_a_finetuned_model_answers_inside_the_template_and_stops_at_end_of_turn(pipeline, start, tmp_path):
    from scalelm.generation.sampling import Sampling
    from scalelm.infer.generate_hf import generate
    from tests.helpers.corpus import make_sentence, make_words

    rng, words = random.Random(0), make_words(100)
    raw = tmp_path / "raw" / "yes.jsonl"
    raw.parent.mkdir()
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": make_sentence(rng, words)},
                                                    {"role": "assistant", "content": "Yes."}]}) + "\n" for _ in range(200)))
    write_chat_shards([raw], pipeline["tokenizer"], tmp_path / "shards", seq_len=128, workers=1, progress=False)
    run = tmp_path / "run"
    train(load_finetune_config(None, [f"data.train={tmp_path / 'shards'}", f"train.init_from={start}", f"log.dir={run}",
                                      "train.steps=50", "train.eval_every=0", *RUN, "optim.lr=1e-2",
                                      "train.global_batch_size=8"]), "finetune")
    answer = generate(run / "checkpoints", "Kalo mi ren?", Sampling(max_new_tokens=24, temperature=0), chat=True,
                      stream=False)
    assert answer == "Yes."  # the reply, then <|end|>: generation stopped there, with 20 tokens still allowed


def test_a_tokenizer_the_start_names_by_a_path_not_found_here_is_one_line(sft_start, tmp_path, monkeypatch):
    """A checkpoint keeps data.tokenizer as its run gave it: a relative path, from another directory, is not found."""
    import shutil

    ckpt = store.resolve(sft_start)
    moved = tmp_path / "ckpt"
    shutil.copytree(ckpt, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["config"]["data"]["tokenizer"] = "runs/demo/tokenizer.model"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^train.init_from's run named its tokenizer runs/demo/tokenizer.model, which "
                                          r"is not found from .*: give data.tokenizer=PATH"):
        load_finetune_config(None, [f"train.init_from={moved}", *RUN])
