from pathlib import Path

import pytest
import yaml

from scalelm.config import Config, from_dict, load_config, to_dict, validate
from scalelm.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def write(tmp_path, data) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_preset_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.model.hidden_size % cfg.model.num_heads == 0
    assert cfg.model.ffn_hidden_size > 0 and cfg.checkpoint.dir


def test_gpt3_presets_match_the_paper_table():
    table = {"125m": (12, 768, 256, 6e-4), "350m": (24, 1024, 256, 3e-4), "760m": (24, 1536, 256, 2.5e-4),
             "1.3b": (24, 2048, 512, 2e-4), "2.7b": (32, 2560, 512, 1.6e-4), "6.7b": (32, 4096, 1024, 1.2e-4),
             "13b": (40, 5120, 1024, 1e-4), "175b": (96, 12288, 1536, 0.6e-4)}
    for name, (layers, hidden, batch, lr) in table.items():
        cfg = load_config(Path(CONFIGS[0]).parent / f"gpt3-{name}.yaml")
        assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.global_batch_size) == (layers, hidden, batch)
        assert cfg.optim.lr == pytest.approx(lr) and cfg.train.seq_len == 2048


def test_yaml_and_dotted_overrides(tmp_path):
    path = write(tmp_path, {"optim": {"lr": 1e-3}, "train": {"steps": 10}})
    cfg = load_config(path, ["optim.lr=3e-4", "train.precision=fp16", "data.train=shards/a",
                             "data.weights=[1, 2]", "data.train=[a, b]", "parallel.sequence_parallel=false"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # "3e-4" is a string to YAML
    assert cfg.train.steps == 10 and cfg.train.precision == "fp16"
    assert cfg.data.train == ["a", "b"] and cfg.data.weights == [1.0, 2.0]


def test_a_single_source_becomes_a_list():
    assert load_config(None, ["data.train=shards"]).data.train == ["shards"]


def test_derived_values():
    cfg = load_config(None, ["model.hidden_size=256", "model.num_heads=4", "model.activation=swiglu",
                             "log.dir=runs/x", "train.steps=50"])
    assert cfg.model.num_kv_heads == 4
    assert cfg.model.ffn_hidden_size == 768  # 8/3 x 256 = 682.7, rounded up to a multiple of 256
    assert cfg.checkpoint.dir == "runs/x/checkpoints" and cfg.optim.decay_steps == 50


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], "unknown config key optim.lrr: did you mean optim.lr?"),
    (["modle.num_layers=2"], "unknown config key modle: did you mean model?"),
    (["train.steps=many"], "train.steps='many' is not a whole number"),
    (["train.steps=2.5"], "train.steps=2.5 is not a whole number"),
    (["train.steps=true"], "train.steps=True is not a whole number"),
    (["model.num_layers=yes"], "model.num_layers=True is not a whole number"),
    (["optim.lr=fast"], "optim.lr='fast' is not a finite number"),
    (["optim.lr=nan"], "optim.lr='nan' is not a finite number"),
    (["optim.lr=.inf"], "is not a finite number"),
    (["optim.beta1=5"], "optim.beta1=5.0 must be in [0, 1)"),
    (["optim.eps=-1"], "optim.eps=-1.0 must be positive"),
    (["model.init_std=0"], "model.init_std=0.0 must be positive"),
    (["optim.decay_steps=0"], "optim.decay_steps=0 must be positive"),
    (["train.resume="], "train.resume is empty: give a path (or auto / none)"),
    (["checkpoint.dir="], "checkpoint.dir is empty"),
    (["train.precision=fp8"], "train.precision='fp8' is not allowed: use one of fp32, bf16, fp16"),
    (["parallel.sequence_parallel=maybe"], "is not a boolean"),
    (["train.steps=0"], "train.steps=0 must be at least 1"),
    (["optim.lr"], "is not key=value"),
    (["parallel.tensor=5"], "parallel.tensor=5 does not divide the 12 attention heads: use one of 1, 2, 3, 4, 6, 12"),
    (["model.num_heads=16", "model.num_kv_heads=4", "parallel.tensor=8"],
     "parallel.tensor=8 does not divide the 4 attention heads"),
    (["model.num_heads=10"], "model.hidden_size=768 does not divide by model.num_heads=10"),
    (["model.num_kv_heads=5"], "model.num_kv_heads=5 does not divide model.num_heads=12: use one of 1, 2, 3, 4, 6, 12"),
    (["parallel.pipeline=5"], "parallel.pipeline=5 does not divide model.num_layers=12: use one of 1, 2, 3, 4, 6, 12"),
    (["parallel.pipeline=2", "parallel.zero_stage=2"], "use zero_stage 1 with pipelines"),
    (["parallel.zero_stage=0"], "parallel.zero_stage=0 is not supported: use 1"),
    (["train.max_bad_steps=0"], "train.max_bad_steps=0 must be at least 1"),
    (["parallel.tensor=3"], "parallel.tensor=3 does not divide 128"),
    (["parallel.zero_stage=4"], "parallel.zero_stage=4 is not a ZeRO stage: use 1, 2 or 3"),
    (["parallel.timeout=0"], "parallel.timeout=0.0 must be a positive number of seconds"),
    (["parallel.sequence_parallel=true"], "sequence_parallel=true needs parallel.tensor > 1"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "use e.g. 12"),
    (["optim.min_lr=1", "optim.lr=0.1"], "optim.min_lr=1.0 is above optim.lr=0.1"),
    (["data.train=[a, b]", "data.weights=[1]"], "data.weights has 1 entries but data.train has 2"),
    (["model.dropout=1.5"], "model.dropout=1.5 must be in [0, 1)"),
    (["train.seq_len=4096", "model.max_position_embeddings=2048"], "raise it to at least 4096"),
    (["finetune.lora.targets=[qkv,mlp]"], "finetune.lora.targets=['qkv', 'mlp']: 'mlp' is no target; use some of qkv, proj, fc1, fc2"),
    (["finetune.lora.targets=[]"], "finetune.lora.targets=[]: no target"),
    (["finetune.lora.rank=0"], "finetune.lora.rank=0 must be from 1 to 768, the narrowest side of the adapted layers"),
    (["finetune.lora.rank=1000", "finetune.lora.targets=[fc1]"], "finetune.lora.rank=1000 must be from 1 to 768"),
    (["finetune.lora.alpha=0"], "finetune.lora.alpha=0.0 must be positive"),
    (["finetune.lora.dropout=1"], "finetune.lora.dropout=1.0 must be in [0, 1)"),
    (["finetune.lora=8"], "finetune.lora=8: expected a section of keys"),
    (["finetune.objective=dpo", "finetune.dpo.loss=kto"], "finetune.dpo.loss"),
])
def test_errors_name_field_value_and_fix(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_lora_is_a_section_or_null():
    cfg = load_config(None, ["finetune.lora.rank=16"])
    assert cfg.finetune.lora.rank == 16 and cfg.finetune.lora.targets == ["qkv", "proj"] and cfg.finetune.lora.alpha == 16
    assert load_config(None, ["finetune.lora.rank=16", "finetune.lora=null"]).finetune.lora is None
    assert load_config(None).finetune.lora is None


def test_world_size_rules():
    cfg = load_config(None, ["parallel.tensor=2", "train.global_batch_size=8", "train.micro_batch_size=2"])
    validate(cfg, world_size=4)  # dp=2, 8 = 2 x 2 x 2
    with pytest.raises(ConfigError, match="world size 3 does not divide by parallel.tensor x parallel.pipeline = 2"):
        validate(cfg, world_size=3)
    with pytest.raises(ConfigError, match=r"micro_batch_size x data_parallel = 2 x 3 = 6: use 12"):
        validate(cfg, world_size=6)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown config key train.stepz"):
        load_config(write(tmp_path, {"train": {"stepz": 3}}))


def test_round_trip_through_dict():
    cfg = load_config(None, ["optim.lr=1e-3", "data.train=[x]"])
    again = validate(from_dict(to_dict(cfg)))
    assert again == cfg and isinstance(again, Config)
