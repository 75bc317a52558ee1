import shutil
from pathlib import Path

import pytest
import yaml

from scalelm.cli import build_parser, main
from scalelm.config import from_dict, load_config

ROOT = Path(__file__).parents[2]
COMMANDS = [["prepare"], ["tokenizer"], ["tokenizer", "train"], ["shard"], ["inspect"], ["config"], ["convert"],
            ["convert", "to-hf"], ["convert", "from-hf"], ["convert", "to-gguf"], ["generate"], ["eval"], ["score"],
            ["finetune"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage: scalelm" in capsys.readouterr().out


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("prepare", "tokenizer", "shard", "inspect", "config", "convert", "generate", "eval"))


@pytest.mark.parametrize("argv, message", [
    (["prepare", "/no/such/dir", "--out", "{tmp}/out"], "input not found: /no/such/dir"),
    (["prepare", "--out", "{tmp}/out"], "give INPUT files or directories, or --demo"),
    (["tokenizer", "train", "{tmp}", "--vocab-size", "500", "--out", "{tmp}/t.model"], "no readable files"),
    (["shard", "{tmp}", "--tokenizer", "{tmp}/none.model", "--out", "{tmp}/s"], "tokenizer not found"),
    (["shard", "{tmp}", "--tokenizer", "{tmp}/none.model", "--out", "{tmp}/s", "--shard-size", "big"], "not understood"),
    (["inspect", "{tmp}"], "manifest.json is missing"),
    (["config", "configs/tiny.yaml", "optim.lrr=1"], "did you mean optim.lr?"),
    (["config", "configs/dpo-tiny.yaml", "finetune.dpo.beta=0"], "finetune.dpo.beta=0.0 must be positive"),
])
def test_bad_input_is_one_line_and_status_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    status = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("scalelm: error: ") and err.count("\n") == 1 and message in err


def test_config_prints_the_resolved_config(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["config", "configs/tiny.yaml", "optim.lr=1e-3"]) == 0
    printed = from_dict(yaml.safe_load(capsys.readouterr().out))
    assert printed == load_config("configs/tiny.yaml", ["optim.lr=1e-3"])


def test_inspect_verify_failure_exits_2(pipeline, tmp_path, capsys):
    copy = shutil.copytree(pipeline["shards"], tmp_path / "copy")
    (copy / "val-000000.tar").write_bytes(b"garbage")
    assert main(["inspect", str(copy), "--verify"]) == 2
    captured = capsys.readouterr()
    assert "BAD" in captured.out and "failed verification" in captured.err


def test_parser_builds():
    assert build_parser().prog == "scalelm"
