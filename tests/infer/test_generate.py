"""`scalelm generate CKPT` on scalelm's decoder, against transformers on the exported model: greedy text token for
token, log-probs as transformers computes them, the same samples on a tensor-parallel launch, and bad inputs."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from scalelm.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("convert")]  # the worker that trains the models once

PROMPTS = ["The river", "Upon a time", "A"]


def _generated(ckpt, tmp_path, *flags) -> list[dict]:
    tmp_path.mkdir(exist_ok=True)
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert main(["generate", str(ckpt), "--prompts", str(prompts), "--out", str(out), *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_greedy_is_transformers_token_for_token_and_logprobs_are_its_log_softmax(trained, exported, tmp_path, name):
    records = _generated(trained[name], tmp_path, "--temperature", "0", "--max-new-tokens", "12")
    tokenizer = AutoTokenizer.from_pretrained(exported[name])
    model = AutoModelForCausalLM.from_pretrained(exported[name], dtype=torch.float32).eval()
    assert [r["prompt_index"] for r in records] == [0, 1, 2]
    for r in records:
        ids = tokenizer(PROMPTS[r["prompt_index"]], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
            logps = model(out).logits[0, ids.shape[1] - 1:-1].log_softmax(-1)
        theirs = out[0, ids.shape[1]:].tolist()
        assert r["token_ids"] == theirs, (r["prompt_index"], r["text"], tokenizer.decode(theirs))
        assert torch.allclose(torch.tensor(r["logprobs"]), logps.gather(-1, out[0, ids.shape[1]:, None])[:, 0], atol=1e-4)
        assert r["finish_reason"] == ("length" if len(theirs) == 12 else "stop")
        assert r["sampling_logprobs"] == [0.0] * len(theirs)


def test_a_tensor_parallel_launch_samples_what_one_process_does(trained, tmp_path):
    flags = ["--temperature", "1.0", "--top-k", "20", "--num-samples", "2", "--max-new-tokens", "8", "--seed", "3"]
    alone = _generated(trained["gpt"], tmp_path / "alone", *flags)
    split = _generated(trained["gpt"], tmp_path / "tp2", *flags, "--nproc-per-node", "2", "parallel.tensor=2")
    assert [r["token_ids"] for r in split] == [r["token_ids"] for r in alone]
    assert len(alone) == 6 and len({tuple(r["token_ids"]) for r in alone}) > 3
    for a, b in zip(alone, split):
        assert a["text"] == b["text"] and torch.allclose(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), atol=1e-5)
        assert all(s <= 0 for s in a["sampling_logprobs"])


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_inputs_are_one_line_each(trained, capsys, tmp_path):
    ckpt = str(trained["gpt"])
    assert "context is 32" in _error(capsys, ["generate", ckpt, "--prompt", "the " * 40])
    assert "context is 32" in _error(capsys, ["generate", ckpt, "--prompt", "the " * 40, "--nproc-per-node", "2"])  # no rank started
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "holds no prompt" in _error(capsys, ["generate", ckpt, "--prompts", str(tmp_path / "empty.jsonl")])
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    assert f"{tmp_path / 'bad.jsonl'}:2: not JSON" in _error(capsys, ["generate", ckpt, "--prompts", str(tmp_path / "bad.jsonl")])
    assert "--temperature=-0.5: use 0 (greedy) or more" in _error(capsys, ["generate", ckpt, "--prompt", "a",
                                                                            "--temperature", "-0.5"])
    assert "--top-p=0.0: use in (0, 1]" in _error(capsys, ["generate", ckpt, "--prompt", "a", "--top-p", "0"])
    assert "scalelm's decoder only" in _error(capsys, ["generate", ckpt, "--prompt", "a", "--backend", "hf", "--stop", "x"])
    assert main(["generate", ckpt, "--prompt", "The river", "--max-new-tokens", "40", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    cut = int(re.search(r"--max-new-tokens 40 is cut to (\d+) for the longest prompt: the model's context is 32 tokens",
                        out.err).group(1))
    assert 20 < cut < 32 and out.out.strip()


def test_a_stop_text_ends_the_sample_and_is_cut_from_it(trained, tmp_path):
    (whole,) = _generated(trained["llama"], tmp_path / "whole", "--temperature", "0", "--max-new-tokens", "12")[:1]
    stop = whole["text"].strip()[3:6]
    (cut,) = _generated(trained["llama"], tmp_path / "cut", "--temperature", "0", "--max-new-tokens", "12", "--stop", stop)[:1]
    assert cut["finish_reason"] == "stop" and stop not in cut["text"] and whole["text"].startswith(cut["text"])
    assert cut["token_ids"] == whole["token_ids"][:len(cut["token_ids"])] and len(cut["token_ids"]) < 12
