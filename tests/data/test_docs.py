from scalelm.data.docs import DocWriter
from scalelm.data.readers import list_input_files, read_documents


def test_rolls_over_and_leaves_no_temporary_files(tmp_path):
    writer = DocWriter(tmp_path, max_bytes=100)
    texts = [f"document number {i} " * 5 for i in range(5)]
    for text in texts:
        writer.write(text)
    files = writer.close()
    assert files == [f"docs-{i:05d}.jsonl.zst" for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    assert list(read_documents(list_input_files([tmp_path]))) == texts


def test_unicode_is_written_as_is(tmp_path):
    writer = DocWriter(tmp_path)
    writer.write("naïve — 漢字 👩\u200d💻")
    writer.close()
    assert list(read_documents(list_input_files([tmp_path]))) == ["naïve — 漢字 👩\u200d💻"]
