"""Shared fixtures: every test makes its own data; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalelm.data.prepare import prepare
from scalelm.data.shards import write_shards
from scalelm.data.tokenizer import train_tokenizer
from scalelm.data.workers import preload_workers
from tests.helpers.corpus import write_conversations, write_corpus
from tests.helpers.ranks import PRELOAD
from tests.helpers.trained import train_models

# one forkserver per test process serves the spawned ranks and the data workers alike, whichever asks first
preload_workers(PRELOAD)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    """raw corpus -> documents -> tokenizer -> shards, made once for the session (about 100K tokens)."""
    root = tmp_path_factory.mktemp("pipeline")
    raw = write_corpus(root / "raw", n_docs=300)
    prepare([raw], root / "docs", workers=1, progress=False)
    train_tokenizer([root / "docs"], root / "tok.model", vocab_size=400, workers=1)
    write_shards([root / "docs"], root / "tok.model", root / "shards", shard_size=64 << 10, val_fraction=0.1,
                 workers=1, progress=False)
    return {"raw": raw, "docs": root / "docs", "tokenizer": root / "tok.model", "shards": root / "shards"}


@pytest.fixture(scope="session")
def chat(pipeline, tmp_path_factory) -> dict[str, Path]:
    """Conversations in every form `scalelm shard --chat` reads, and chat shards of them (the pipeline's tokenizer)."""
    from scalelm.data.chat_shards import write_chat_shards

    root = tmp_path_factory.mktemp("chat")
    raw = write_conversations(root / "raw", n=400)
    write_chat_shards([raw], pipeline["tokenizer"], root / "shards", seq_len=128, shard_size=64 << 10,
                      val_fraction=0.1, workers=1, progress=False)
    return {"raw": raw, "shards": root / "shards", "tokenizer": pipeline["tokenizer"]}


@pytest.fixture(scope="session")
def prompts(pipeline, tmp_path_factory) -> Path:
    """Prompt shards of plain-text prompts with answers (tests/helpers/rl.py), for the RL tests."""
    from scalelm.data.prompt_shards import write_prompt_shards
    from tests.helpers.rl import write_prompts

    root = tmp_path_factory.mktemp("prompts")
    write_prompt_shards([write_prompts(root / "raw")], pipeline["tokenizer"], root / "shards", val_fraction=0.0,
                        progress=False)
    return root / "shards"


@pytest.fixture(scope="session")
def sft_start(pipeline, tmp_path_factory) -> Path:
    """The checkpoint.dir of a tiny model pretrained for 4 steps, whose context fits the chat shards' conversations."""
    from scalelm.config import load_config
    from scalelm.train.loop import pretrain
    from tests.helpers.launched import SFT_MODEL, SFT_RUN

    root = tmp_path_factory.mktemp("sft-start")
    pretrain(load_config(None, [f"data.train={pipeline['shards']}", f"data.tokenizer={pipeline['tokenizer']}",
                                f"log.dir={root}", "train.steps=4", "train.eval_every=0", *SFT_MODEL, *SFT_RUN]))
    return root / "checkpoints"


@pytest.fixture(scope="session")
def trained(pipeline, tmp_path_factory) -> dict[str, Path]:
    """The models of tests/trained.py: {"gpt": checkpoint.dir, "llama": checkpoint.dir}."""
    return train_models(pipeline, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory) -> dict[str, Path]:
    """The trained models' Hugging Face exports: {"gpt": folder, "llama": folder}."""
    from scalelm.cli import main

    root = tmp_path_factory.mktemp("hf")
    for name, ckpt in trained.items():
        assert main(["convert", "to-hf", str(ckpt), str(root / name)]) == 0
    return {name: root / name for name in trained}


@pytest.fixture(scope="session")
def across_on_one_host(pipeline, tmp_path_factory) -> Path:
    """The run tests/launched.py's ACROSS describes, on two ranks of this one host: what runs across hosts match."""
    from tests.helpers.launched import ACROSS, on_one_host

    return on_one_host(pipeline, tmp_path_factory.mktemp("one-host"), *ACROSS)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    """Two hosts, node1 and node2, made of namespaces on this machine (tests/hosts.py), for a module's tests."""
    from tests.helpers.hosts import HostsError, TwoHosts
    from tests.helpers.launched import running

    with running(TwoHosts(tmp_path_factory.mktemp("hosts")), HostsError) as hosts:
        yield hosts


def pytest_addoption(parser):
    parser.addoption("--llamacpp", action="store_true", help="run the tests marked llamacpp (needs llama-cpp-python)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--llamacpp"):
        return
    skip = pytest.mark.skip(reason="opt-in: pytest --llamacpp (llama-cpp-python compiles for 10+ minutes)")
    for item in items:
        if "llamacpp" in item.keywords:
            item.add_marker(skip)
