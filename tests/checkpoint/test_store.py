import pytest
import torch

from scalelm.checkpoint import store
from scalelm.data.files import sha256_file
from scalelm.errors import CheckpointError


def save(root, step: int, tensors: dict | None = None) -> None:
    tmp = store.start(root, step)
    tensors = tensors if tensors is not None else {"w": torch.full((3, 2), float(step))}
    files = {"model-00000.safetensors": store.write_tensors(tmp / "model-00000.safetensors", tensors)}
    entries = {name: {"model": "model-00000.safetensors", "optimizer": "model-00000.safetensors"} for name in tensors}
    store.commit(root, step, {"step": step, "files": files, "tensors": entries})


def test_write_tensors_records_size_and_sha256(tmp_path):
    record = store.write_tensors(tmp_path / "t.safetensors", {"a": torch.arange(10.0)}, {"k": "v"})
    assert record == {"bytes": (tmp_path / "t.safetensors").stat().st_size, "sha256": sha256_file(tmp_path / "t.safetensors")}


def test_commit_renames_and_moves_latest_and_prune_keeps_the_newest(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step)
    assert (tmp_path / "latest").read_text().strip() == "step-00000030"
    assert [p.name for p in store.committed(tmp_path)] == ["step-00000030", "step-00000020", "step-00000010"]
    assert [p.name for p in store.prune(tmp_path, 2)] == ["step-00000010"]
    assert [p.name for p in store.committed(tmp_path)] == ["step-00000030", "step-00000020"]
    assert store.resolve(tmp_path).name == "step-00000030"
    assert store.resolve(tmp_path / "step-00000020").name == "step-00000020"


def test_an_unfinished_save_is_invisible_and_cleared_by_the_next(tmp_path):
    save(tmp_path, 1)
    store.start(tmp_path, 2)  # killed before its commit
    (tmp_path / "step-00000003").mkdir()  # no manifest: not a checkpoint either
    assert [p.name for p in store.committed(tmp_path)] == ["step-00000001"]
    assert store.resolve(tmp_path).name == "step-00000001"
    save(tmp_path, 4)
    assert not (tmp_path / "step-00000002.tmp").exists()


def test_verify_finds_missing_truncated_and_damaged_files(tmp_path):
    save(tmp_path, 1)
    ckpt = store.resolve(tmp_path)
    manifest = store.read_manifest(ckpt)
    names = sorted(manifest["files"])
    assert store.verify(ckpt, manifest, names) == []
    path = ckpt / names[0]
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert "does not match its SHA-256" in store.verify(ckpt, manifest, names)[0]
    path.write_bytes(data[:-5])
    assert "truncated" in store.verify(ckpt, manifest, names)[0]
    path.unlink()
    assert "missing" in store.verify(ckpt, manifest, names)[0]


def test_reader_gives_whole_tensors_and_clear_errors(tmp_path):
    save(tmp_path, 1, {"a": torch.ones(2), "exp_avg/a": torch.zeros(2)})
    ckpt = store.resolve(tmp_path)
    reader = store.TensorReader(ckpt, store.read_manifest(ckpt))
    assert torch.equal(reader.get("param", "a"), torch.ones(2)) and torch.equal(reader.get("exp_avg", "a"), torch.zeros(2))
    with pytest.raises(CheckpointError, match="no tensor b: the checkpoint holds another model"):
        reader.get("param", "b")
    (ckpt / "model-00000.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read"):
        store.TensorReader(ckpt, store.read_manifest(ckpt)).get("param", "a")


@pytest.mark.parametrize("text, message", [
    (None, "no manifest.json, so not a complete checkpoint"),
    ("[1, 2", "is damaged"),
    ('{"format": "other"}', "is not a scalelm checkpoint manifest"),
    ('{"format": "scalelm-checkpoint", "version": 99}', "checkpoint format version 99"),
])
def test_bad_manifests(tmp_path, text, message):
    if text is not None:
        (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        store.read_manifest(tmp_path)


def test_resolve_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint, and holds none"):
        store.resolve(tmp_path)


def test_files_are_safetensors_that_safetensors_reads_back(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(4).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(7), "u8": torch.get_rng_state(), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
               "bool": torch.tensor([True, False]), "strided": torch.randn(4, 6).t()}
    store.write_tensors(tmp_path / "t.safetensors", tensors, {"note": "hi"})
    back = load_file(tmp_path / "t.safetensors")
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with safe_open(tmp_path / "t.safetensors", framework="pt") as f:
        assert f.metadata() == {"note": "hi"}
