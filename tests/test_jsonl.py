"""The one JSONL reader (ensemble.jsonl) used by train_edits' corpora and tasks and serve's gate corpus."""

import gzip
import json

import pytest

from ensemble.jsonl import DataError, iter_jsonl
from serve.abtest import read_corpus
from train_edits.corpora import read_chunks, read_documents
from train_edits.tasks import DataError as TrainDataError
from train_edits.tasks import read_examples


def test_records_with_their_line_numbers_blank_lines_skipped_gzip_read(tmp_path):
    lines = [json.dumps({"text": "a"}), "", "   ", json.dumps({"text": "b"})]
    plain, packed = tmp_path / "c.jsonl", tmp_path / "c.jsonl.gz"
    plain.write_text("\n".join(lines) + "\n")
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    expected = [(1, {"text": "a"}), (4, {"text": "b"})]
    assert list(iter_jsonl(plain)) == expected
    assert list(iter_jsonl(packed)) == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "c.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)"),
        ("[1, 2]", "c.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_a_bad_line_is_named(tmp_path, line, message):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        list(iter_jsonl(p))
    assert str(err.value).endswith(message) and err.value.line == 2


def test_every_reader_reports_a_bad_line_the_same_way(tmp_path):
    assert TrainDataError is DataError  # train_edits' callers catch the same type
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "fine", "input_ids": [1, 2], "prefix": "a", "suffix": " b"}) + "\n[1]\n")
    for read in (
        lambda: read_documents([p]),
        lambda: read_chunks(p, vocab_size=10),
        lambda: read_examples(p),
        lambda: read_corpus(p),
    ):
        with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object, got list"):
            read()
