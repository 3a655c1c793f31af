"""Pack format: round trip, content versions, and one specific refusal per kind of corruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edits_store import (
    SCHEMA_VERSION,
    CalibrationEntry,
    DuplicatePairError,
    Expectations,
    HashMismatchError,
    IncompatiblePackError,
    MissingBetaError,
    MissingFileError,
    NonFiniteError,
    PackError,
    PackNotFoundError,
    SchemaError,
    SenseIdRangeError,
    TensorFormatError,
    TokenIdRangeError,
    TruncatedFileError,
    build_pack,
    read_pack,
    with_calibration,
    write_pack,
)
from tests.test_store_fixtures import (
    BACKPACK_FP,
    CALIBRATION,
    SENSES,
    TARGET_FP,
    TOKENIZER_FP,
    VOCAB,
    assert_content,
    expected_edits,
    make_pack,
    write_raw_pack,
)

SERVED = Expectations(
    backpack_fingerprint=BACKPACK_FP,
    tokenizer_fingerprint=TOKENIZER_FP,
    vocab_size=VOCAB,
    num_senses=SENSES,
    d_model=16,
    target_fingerprint=TARGET_FP,
)


@pytest.fixture
def good(tmp_path) -> Path:
    folder = tmp_path / "pack"
    write_pack(make_pack(3), folder)
    return folder


def raw_tensors(seed: int = 3, n: int = 8, d: int = 16) -> dict[str, torch.Tensor]:
    tokens, senses, deltas = expected_edits(seed, n, d)
    return {"token_ids": tokens.clone(), "sense_ids": senses.clone(), "deltas": deltas.clone()}


def refused(exc_type: type[PackError], fn, *args, **kwargs) -> PackError:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.check and err.pack, "every refusal names the pack and the check"
    assert err.check in str(err)
    return err


# --------------------------------------------------------------------------- round trip and versions


def test_round_trip_is_bit_exact_and_validates_against_the_served_model(good):
    pack = read_pack(good, expect=SERVED)
    assert_content(pack, seed=3)
    m = pack.manifest
    assert m.schema_version == SCHEMA_VERSION
    assert (m.n_senses_edited, m.d_model, m.vocab_size, m.num_senses) == (8, 16, VOCAB, SENSES)
    assert m.beta_for(TARGET_FP).beta == 2.5
    assert m.backpack == {"name": "backpack-tiny", "fingerprint": BACKPACK_FP}
    assert m.training["seed"] == 3
    on_disk = json.loads((good / "manifest.json").read_text())
    assert set(on_disk) == {
        "schema_version",
        "name",
        "version",
        "created_at",
        "backpack",
        "tokenizer_fingerprint",
        "vocab_size",
        "num_senses",
        "d_model",
        "n_senses_edited",
        "epsilon",
        "calibration",
        "training",
        "evaluation",
        "files",
    }
    assert on_disk["created_at"].endswith("Z")


def test_same_content_gives_same_version_whatever_the_row_order_or_build_time():
    a = make_pack(5)
    tokens, senses, deltas = expected_edits(5)
    b = build_pack(
        "demo",
        tokens,
        senses,
        deltas,
        backpack_name="backpack-tiny",
        backpack_fingerprint=BACKPACK_FP,
        tokenizer_fingerprint=TOKENIZER_FP,
        vocab_size=VOCAB,
        num_senses=SENSES,
        epsilon=1e-4,
        calibration=[CALIBRATION],
        training={"seed": 5, "task": "country-capital", "epochs": 3},
        evaluation={"success_rate": 0.9},
    )
    assert a.version == b.version
    assert len(a.version) == 32 and int(a.version, 16) >= 0


@pytest.mark.parametrize("change", ["delta", "epsilon", "name", "training", "backpack"])
def test_any_content_change_gives_a_new_version(change):
    base = make_pack(5)
    if change == "delta":
        tokens, senses, deltas = expected_edits(5)
        deltas[0, 0] = torch.nextafter(deltas[0, 0], torch.tensor(10.0))  # one ulp
        other = build_pack(
            "demo",
            tokens,
            senses,
            deltas,
            backpack_name="backpack-tiny",
            backpack_fingerprint=BACKPACK_FP,
            tokenizer_fingerprint=TOKENIZER_FP,
            vocab_size=VOCAB,
            num_senses=SENSES,
            epsilon=1e-4,
            calibration=[CALIBRATION],
            training={"seed": 5, "task": "country-capital", "epochs": 3},
            evaluation={"success_rate": 0.9},
        )
    else:
        overrides = {
            "epsilon": dict(epsilon=2e-4),
            "name": dict(name="other"),
            "training": dict(training={"seed": 5, "task": "country-capital", "epochs": 4}),
            "backpack": dict(backpack_fingerprint="sha256:" + "c" * 64),
        }[change]
        other = make_pack(5, **overrides)
    assert other.version != base.version


def test_with_calibration_adds_or_replaces_a_target_and_makes_a_new_version():
    pack = make_pack(1)
    second = CalibrationEntry(
        target_model="llama",
        target_fingerprint="sha256:" + "a" * 64,
        beta=0.7,
        ball_ratio=1.00001,
        g_fingerprint="sha256:" + "6" * 64,
        g_tokens=4096,
        epsilon=1e-4,
    )
    added = with_calibration(pack, [second])
    assert added.version != pack.version
    assert {e.target_fingerprint for e in added.manifest.calibration} == {TARGET_FP, second.target_fingerprint}
    replaced = with_calibration(added, [CALIBRATION.model_copy(update={"beta": 1.25})])
    assert replaced.manifest.beta_for(TARGET_FP).beta == 1.25
    assert replaced.manifest.beta_for(second.target_fingerprint).beta == 0.7
    assert len({pack.version, added.version, replaced.version}) == 3
    assert torch.equal(replaced.deltas, pack.deltas)


def test_build_refuses_what_read_refuses():
    tokens, senses, deltas = expected_edits(0)
    common = dict(
        backpack_name="b",
        backpack_fingerprint=BACKPACK_FP,
        tokenizer_fingerprint=TOKENIZER_FP,
        vocab_size=VOCAB,
        num_senses=SENSES,
        epsilon=1e-4,
    )
    bad = deltas.clone()
    bad[2, 3] = float("inf")
    refused(NonFiniteError, build_pack, "p", tokens, senses, bad, **common)
    refused(TokenIdRangeError, build_pack, "p", tokens + VOCAB, senses, deltas, **common)
    refused(SenseIdRangeError, build_pack, "p", tokens, senses + SENSES, deltas, **common)
    dup_t, dup_s = tokens.clone(), senses.clone()
    dup_t[1], dup_s[1] = dup_t[0], dup_s[0]
    refused(DuplicatePairError, build_pack, "p", dup_t, dup_s, deltas, **common)
    refused(TensorFormatError, build_pack, "p", tokens.float(), senses, deltas, **common)
    refused(SchemaError, build_pack, "bad/name", tokens, senses, deltas, **common)
    refused(SchemaError, build_pack, "p", tokens, senses, deltas, **dict(common, epsilon=float("nan")))


# --------------------------------------------------------------------------- corruption: one error each


def test_flipped_byte_in_tensor_file_is_a_hash_mismatch(good):
    path = good / "senses.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) - 5] ^= 0x01  # inside the deltas
    path.write_bytes(bytes(data))
    err = refused(HashMismatchError, read_pack, good)
    assert not isinstance(err, TruncatedFileError)
    assert (err.file, err.check) == ("senses.safetensors", "sha256")


def test_flipped_byte_that_makes_a_nan_is_still_reported_as_corruption(good):
    path = good / "senses.safetensors"
    data = bytearray(path.read_bytes())
    data[-4:] = bytes.fromhex("0000c07f")  # last float becomes NaN: the hash, not the NaN check, must answer
    path.write_bytes(bytes(data))
    err = refused(HashMismatchError, read_pack, good)
    assert err.check == "sha256"


def test_truncated_tensor_file_is_reported_as_truncated(good):
    path = good / "senses.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    err = refused(TruncatedFileError, read_pack, good)
    assert isinstance(err, HashMismatchError)
    assert (err.file, err.check) == ("senses.safetensors", "size")
    assert str(len(data) - 100) in err.detail and str(len(data)) in err.detail


def test_truncated_manifest_is_a_schema_error(good):
    path = good / "manifest.json"
    path.write_bytes(path.read_bytes()[:200])
    err = refused(SchemaError, read_pack, good)
    assert (err.file, err.check) == ("manifest.json", "json")


@pytest.mark.parametrize(
    "field", ["epsilon", "files", "calibration", "backpack", "tokenizer_fingerprint", "created_at", "d_model"]
)
def test_missing_manifest_field_is_named(good, field):
    path = good / "manifest.json"
    doc = json.loads(path.read_text())
    del doc[field]
    path.write_text(json.dumps(doc))
    err = refused(SchemaError, read_pack, good)
    assert err.file == "manifest.json"
    assert f"missing field '{field}'" in str(err)


def test_missing_schema_version_and_future_schema_version_are_refused(good):
    path = good / "manifest.json"
    doc = json.loads(path.read_text())
    doc["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(doc))
    assert refused(SchemaError, read_pack, good).check == "schema_version"
    del doc["schema_version"]
    path.write_text(json.dumps(doc))
    assert refused(SchemaError, read_pack, good).check == "schema_version"


def test_unknown_manifest_field_and_missing_calibration_field_are_named(good):
    path = good / "manifest.json"
    doc = json.loads(path.read_text())
    doc["surprise"] = 1
    path.write_text(json.dumps(doc))
    assert "unknown field 'surprise'" in str(refused(SchemaError, read_pack, good))
    del doc["surprise"]
    del doc["calibration"][0]["beta"]
    path.write_text(json.dumps(doc))
    assert "missing field 'calibration.0.beta'" in str(refused(SchemaError, read_pack, good))


def test_edited_manifest_no_longer_matches_its_version(good):
    path = good / "manifest.json"
    doc = json.loads(path.read_text())
    doc["calibration"][0]["beta"] = 25.0  # someone "fixes" beta by hand
    path.write_text(json.dumps(doc))
    err = refused(HashMismatchError, read_pack, good)
    assert (err.file, err.check) == ("manifest.json", "version")


def test_missing_tensor_file_and_missing_folder(good, tmp_path):
    (good / "senses.safetensors").unlink()
    err = refused(MissingFileError, read_pack, good)
    assert err.file == "senses.safetensors"
    (good / "manifest.json").unlink()
    assert refused(MissingFileError, read_pack, good).file == "manifest.json"
    refused(PackNotFoundError, read_pack, tmp_path / "nowhere")


def test_wrong_shape_is_a_tensor_format_error(tmp_path):
    base = make_pack(3)
    tensors = raw_tensors()
    tensors["deltas"] = torch.randn(8, 17)  # manifest says d_model = 16
    write_raw_pack(tmp_path / "p", base, tensors)
    err = refused(TensorFormatError, read_pack, tmp_path / "p")
    assert (err.file, err.check) == ("senses.safetensors", "shape")
    assert "deltas" in err.detail and "[8, 17]" in err.detail


def test_row_count_disagreeing_with_manifest_is_a_shape_error(tmp_path):
    tensors = raw_tensors()
    write_raw_pack(tmp_path / "p", make_pack(3), tensors, {"n_senses_edited": 9})
    assert refused(TensorFormatError, read_pack, tmp_path / "p").check == "shape"


def test_wrong_dtype_and_wrong_tensor_names(tmp_path):
    tensors = raw_tensors()
    tensors["deltas"] = tensors["deltas"].double()
    write_raw_pack(tmp_path / "a", make_pack(3), tensors)
    err = refused(TensorFormatError, read_pack, tmp_path / "a")
    assert err.check == "dtype" and "deltas" in err.detail
    tensors = raw_tensors()
    tensors["extra"] = torch.zeros(1)
    write_raw_pack(tmp_path / "b", make_pack(3), tensors)
    assert refused(TensorFormatError, read_pack, tmp_path / "b").check == "tensor_names"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_delta_is_refused(tmp_path, value):
    tensors = raw_tensors()
    tensors["deltas"][5, 7] = value
    write_raw_pack(tmp_path / "p", make_pack(3), tensors)
    err = refused(NonFiniteError, read_pack, tmp_path / "p")
    assert err.check == "finite" and "row 5" in err.detail


def test_huge_but_finite_deltas_are_accepted(tmp_path):
    tensors = raw_tensors()
    tensors["deltas"][:, :] = 3e38  # the sum overflows; every value is still finite
    write_raw_pack(tmp_path / "p", make_pack(3), tensors)
    assert float(read_pack(tmp_path / "p").deltas.max()) == pytest.approx(3e38)


@pytest.mark.parametrize("bad_token", [VOCAB, VOCAB + 1000, -1])
def test_token_id_outside_vocabulary_is_refused(tmp_path, bad_token):
    tensors = raw_tensors()
    tensors["token_ids"][4] = bad_token
    write_raw_pack(tmp_path / "p", make_pack(3), tensors)
    err = refused(TokenIdRangeError, read_pack, tmp_path / "p")
    assert err.check == "token_id_range" and str(bad_token) in err.detail


def test_token_id_beyond_the_served_vocabulary_is_refused(good):
    pack = read_pack(good)
    small = int(pack.token_ids.max())  # the largest id in the pack is not < this vocabulary
    refused(TokenIdRangeError, read_pack, good, expect=Expectations(vocab_size=small))
    assert read_pack(good, expect=Expectations(vocab_size=small + 1)).version == pack.version


def test_sense_id_outside_sense_count_is_refused(tmp_path):
    tensors = raw_tensors()
    tensors["sense_ids"][2] = SENSES
    write_raw_pack(tmp_path / "p", make_pack(3), tensors)
    assert refused(SenseIdRangeError, read_pack, tmp_path / "p").check == "sense_id_range"


def test_duplicate_pair_is_refused(tmp_path):
    tensors = raw_tensors()
    tensors["token_ids"][6] = tensors["token_ids"][1]
    tensors["sense_ids"][6] = tensors["sense_ids"][1]
    write_raw_pack(tmp_path / "p", make_pack(3), tensors)
    err = refused(DuplicatePairError, read_pack, tmp_path / "p")
    assert f"token {int(tensors['token_ids'][1])}, sense {int(tensors['sense_ids'][1])}" in err.detail


@pytest.mark.parametrize(
    "field,check",
    [("backpack_fingerprint", "backpack_fingerprint"), ("tokenizer_fingerprint", "tokenizer_fingerprint")],
)
def test_fingerprint_mismatch_is_refused_unless_overridden(good, field, check):
    other = Expectations(**{**SERVED.__dict__, field: "sha256:" + "0" * 64})
    err = refused(IncompatiblePackError, read_pack, good, expect=other)
    assert err.check == check and err.status == "FAILED_PRECONDITION"
    overridden = Expectations(**{**other.__dict__, "allow_incompatible": True})
    assert_content(read_pack(good, expect=overridden), seed=3)


def test_width_mismatch_cannot_be_overridden(good):
    expect = Expectations(d_model=32, allow_incompatible=True)
    assert refused(IncompatiblePackError, read_pack, good, expect=expect).check == "d_model"


def test_missing_beta_for_served_model_is_refused(good):
    expect = Expectations(**{**SERVED.__dict__, "target_fingerprint": "sha256:" + "e" * 64})
    err = refused(MissingBetaError, read_pack, good, expect=expect)
    assert err.check == "beta_for_target" and "tiny-gptj" in err.detail
    uncalibrated = make_pack(3, calibration=[])
    with pytest.raises(MissingBetaError):
        uncalibrated.manifest.beta_for(TARGET_FP)
