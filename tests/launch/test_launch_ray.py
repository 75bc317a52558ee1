"""The Ray launcher's checks, which run in the job's driver before Ray is asked for anything."""

import pytest

from scalelm.launch.ray import main

ABSOLUTE = ["data.train=/shared/shards", "data.tokenizer=/shared/tok.model", "log.dir=/shared/run"]


@pytest.mark.parametrize("args, message", [
    (["--workers", "2", "data.train=runs/shards", "data.tokenizer=/t.model", "log.dir=/r"],
     "data.train=runs/shards is a relative path"),
    (["--workers", "2", "data.train=/s", "data.tokenizer=/t.model", "log.dir=runs/x"], "log.dir=runs/x is a relative path"),
    (["--workers", "2", *ABSOLUTE, "checkpoint.dir=ckpt"], "checkpoint.dir=ckpt is a relative path"),
    (["--workers", "3", *ABSOLUTE, "parallel.tensor=2"], "world size 3 does not divide"),
    (["--workers", "2", *ABSOLUTE, "train.stepz=3"], "train.stepz"),
])
def test_bad_input_stops_in_the_driver_with_one_line(args, message, capsys):
    assert main(["--config", "configs/tiny.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_urls_need_not_be_absolute(monkeypatch):
    from scalelm.config import load_config
    from scalelm.launch.ray import check_paths

    check_paths(load_config("configs/tiny.yaml", ["data.train=[s3://bucket/shards, pipe:cat /x]", *ABSOLUTE[1:]]))
