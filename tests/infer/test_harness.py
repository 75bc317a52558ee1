"""lm-evaluation-harness on scalelm's engine (infer/harness.py) against lm-eval's own `hf` backend on the model's
Hugging Face export, the oracle: on a multiple-choice task and a rolling log-likelihood task written here (local JSON,
nothing downloaded), every request's log-likelihood equal to 1e-5 (1e-7 of a long text's) and the same accuracy."""

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("convert")]


def write_tasks(root, tokenizer_text: list[str]):
    root.mkdir(parents=True, exist_ok=True)
    docs = [{"context": text[:40], "choices": [text[40:80], text[80:120], text[120:160]], "label": 0}
            for text in tokenizer_text]
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "texts.jsonl").write_text("".join(json.dumps({"text": t[:300]}) + "\n" for t in tokenizer_text))
    (root / "mc.yaml").write_text(f"""task: scalelm_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    (root / "rolling.yaml").write_text(f"""task: scalelm_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'texts.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""")
    return root


def per_request(results) -> dict[str, list]:
    """Per task, per document, the log-likelihood of each of its requests (lm-eval's filtered responses)."""
    return {task: [[float(x[0]) if isinstance(x, (list, tuple)) else float(x) for x in s["filtered_resps"]]
                   for s in samples] for task, samples in results["samples"].items()}


def test_the_harness_on_scalelm_equals_lm_eval_on_the_export(trained, exported, pipeline, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from scalelm.parallel.topology import single_process
    from tests.helpers.harness import scalelm_lm

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    records = (json.loads(line) for line in (pipeline["raw"] / "corpus.jsonl").read_text().splitlines())
    texts = [r["text"] for r in records if len(r["text"]) > 300][:12]
    tasks = write_tasks(tmp_path / "tasks", texts)
    manager = TaskManager(include_path=str(tasks))
    with single_process() as layout:  # the engine's process group, destroyed after: the test process goes on
        ours = lm_eval.simple_evaluate(model=scalelm_lm(trained["gpt"], layout), tasks=["scalelm_mc", "scalelm_rolling"],
                                       task_manager=manager, log_samples=True, batch_size=4)
    # lm-eval's hf backend puts BOS before a context with add_bos_token=True, as scalelm trains
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={exported['gpt']},add_bos_token=True,"
                                                           f"dtype=float32", tasks=["scalelm_mc", "scalelm_rolling"],
                                     task_manager=manager, log_samples=True, batch_size=4, device="cpu")
    mine, oracle = per_request(ours), per_request(theirs)
    assert len(mine["scalelm_mc"]) == 12 and len(mine["scalelm_rolling"]) == 12
    for task in mine:
        for a, b in zip(mine[task], oracle[task], strict=True):
            # NOTE: the oracle sums a rolling text's hundreds of log-probs in float32: 1e-7 of the sum, or 1e-5
            assert a == pytest.approx(b, rel=1e-7, abs=1e-5), task
    assert ours["results"]["scalelm_mc"]["acc,none"] == theirs["results"]["scalelm_mc"]["acc,none"]
