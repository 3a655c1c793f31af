"""train_edits finds bad arguments and data before it loads a model: each is a one-line error naming the
option, the file and the line, exit code 2; records are bounded while streaming, before parsing or tokenising."""

from __future__ import annotations

import gzip
import time
import tracemalloc

import pytest
from click.testing import CliRunner

from ensemble.jsonl import DataError, iter_jsonl
from train_edits.cli import main
from train_edits.corpora import read_documents
from train_edits.tasks import read_examples

GOOD = '{"prefix": "The capital of France is", "suffix": " Paris"}\n'


def _select(tmp_path, *extra, train=None):
    """`train_edits select` on a custom task with a tiny random Backpack (never reached when preflight refuses)."""
    if train is None:
        train = tmp_path / "ok.jsonl"
        train.write_text(GOOD * 3)
    args = ["select", "--train", str(train), "--loss-type", "good", "--threshold", "1.6", "--backpack", "tiny"]
    args += ["--run-dir", str(tmp_path / "run"), "--no-progress", *extra]
    t0 = time.monotonic()
    res = CliRunner().invoke(main, args)
    return res, time.monotonic() - t0


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--lr", "inf"], "train.lr"),
        (["--lr", "nan"], "train.lr"),
        (["--kl-weight", "-inf"], "train.kl_weight"),
        (["--lam", "nan"], "select.lam"),
    ],
)
def test_non_finite_numbers_are_refused_at_once(tmp_path, extra, needle):
    res, _ = _select(tmp_path, *extra)
    assert res.exit_code == 2 and needle in res.output, res.output
    assert not (tmp_path / "run" / "selection.json").exists()


def test_unwritable_run_dir_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(
        main,
        ["select", "--task", "country_capital", "--backpack", "tiny", "--run-dir", str(blocker / "sub")],
    )
    assert res.exit_code == 2 and "--run-dir" in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("kind", ["file", "bad-scheme"])
def test_bad_store_is_found_before_the_run(tmp_path, kind):
    if kind == "file":
        store = tmp_path / "store-file"
        store.write_text("x")
        uri = str(store)
    else:
        uri = "s3://"  # names no bucket
    res, _ = _select(tmp_path, "--store", uri)
    assert res.exit_code == 2 and "--store" in res.output, res.output
    assert not (tmp_path / "run" / "selection.json").exists()


def test_non_utf8_data_names_file_and_line(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(GOOD.encode() + '{"prefix": "caf\xe9", "suffix": " x"}\n'.encode("latin-1"))
    res, _ = _select(tmp_path, train=bad)
    assert res.exit_code == 2 and "latin1.jsonl:2" in res.output and "UTF-8" in res.output, res.output


def _huge_record(path, mb: int) -> None:
    with open(path, "wb") as fh:
        fh.write(GOOD.encode())
        fh.write(b'{"prefix": "')
        block = b"lorem ipsum " * (1 << 16)
        for _ in range(mb * (1 << 20) // len(block)):
            fh.write(block)
        fh.write(b'", "suffix": " x"}\n')


def test_a_64_mb_record_is_refused_before_it_is_read_whole(tmp_path):
    big = tmp_path / "big.jsonl"
    _huge_record(big, 64)
    tracemalloc.start()
    with pytest.raises(DataError) as ei:
        read_examples(big)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "big.jsonl:2" in str(ei.value) and "100000 characters" in str(ei.value)
    assert peak < 8 * (1 << 20), peak  # at most a few limits' worth, not the 64 MB line (nor ~300x it)
    res, _ = _select(tmp_path, train=big)
    assert res.exit_code == 2 and "big.jsonl:2" in res.output, res.output


def test_the_record_limit_is_configurable(tmp_path):
    p = tmp_path / "ok.jsonl"
    p.write_text(GOOD * 2)
    res, _ = _select(tmp_path, "--max-record-chars", "20", train=p)
    assert res.exit_code == 2 and "ok.jsonl:1" in res.output and "20 characters" in res.output


def test_corpora_documents_are_bounded_jsonl_gz_and_txt(tmp_path):
    gz = tmp_path / "docs.jsonl.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write('{"text": "short"}\n{"text": "' + "y" * 5000 + '"}\n')
    with pytest.raises(DataError, match=r"docs\.jsonl\.gz:2: record longer than 1000"):
        read_documents([gz], max_chars=1000)
    txt = tmp_path / "docs.txt"
    txt.write_text("first<|endoftext|>" + "z" * 5000)
    with pytest.raises(DataError, match="document 2 longer than 1000"):
        read_documents([txt], max_chars=1000)
    assert read_documents([txt], max_chars=10_000) == ["first", "z" * 5000]
    res = CliRunner().invoke(
        main, ["prepare-corpora", str(gz), "--out", str(tmp_path / "c"), "--max-record-chars", "1000"]
    )
    assert res.exit_code == 1 and "docs.jsonl.gz:2" in res.output


def test_malformed_numbers_and_nesting_in_data_name_the_line(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text(GOOD + '{"prefix": "a", "suffix": "b", "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match=r"n\.jsonl:2: invalid JSON"):
        list(iter_jsonl(p))
