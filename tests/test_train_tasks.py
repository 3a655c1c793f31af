"""train_edits: records, tokenization rules, losses and success thresholds (hand-computed)."""

import json
import math

import pytest
import torch

from ensemble.backpack import BackpackConfig, BackpackLM
from ensemble.tokenizer import load_tokenizer
from tests.conftest import SHARED
from train_edits.encoding import encode_example, encode_prefix_suffix, encode_text
from train_edits.evaluate import BackpackScorer, EncodedTask, success_rate, task_metrics
from train_edits.losses import token_nll, training_loss
from train_edits.tasks import (
    TASKS,
    DataError,
    LossType,
    PairExample,
    SingleExample,
    TaskData,
    TextExample,
    example_score,
    is_failure,
    read_examples,
)

DATA = str(SHARED / "data" / "canonical-examples")
needs_data = pytest.mark.skipif(
    not (SHARED / "data" / "canonical-examples").is_dir(),
    reason=f"the canonical-examples data is not at {DATA} (set SENSEPACK_SHARED)",
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return BackpackLM(BackpackConfig.tiny()).eval()


# --------------------------------------------------------------------------- thresholds


def test_paper_thresholds_and_loss_types():
    expect = {
        "country_capital": ("good", -math.log(0.2)),
        "company_ceo": ("good", -math.log(0.05)),
        "temporal": ("good", -math.log(0.05)),
        "stereoset": ("bad", math.log(0.001)),
        "pronoun_gender_bias": ("balance", math.log(1.5)),
        "verb_conjugation": ("good-v-bad", math.log(1 / 16)),
    }
    assert set(TASKS) == set(expect)
    for name, (lt, thr) in expect.items():
        assert TASKS[name].loss_type.value == lt
        assert TASKS[name].threshold == pytest.approx(thr, abs=1e-12)


@pytest.mark.parametrize("p, fails", [(0.25, False), (0.2, False), (0.19, True)])
def test_good_threshold_country(p, fails):
    nll = -math.log(p)  # summed NLL of the suffix
    score = example_score(LossType.GOOD, nll)
    assert score == pytest.approx(nll)
    # p = 0.2 sits exactly at the threshold: not a failure (strict >)
    assert is_failure(score, TASKS["country_capital"].threshold) is fails


def test_bad_threshold_stereoset():
    thr = TASKS["stereoset"].threshold
    assert example_score(LossType.BAD, -math.log(0.002)) == pytest.approx(math.log(0.002))
    assert is_failure(example_score(LossType.BAD, -math.log(0.002)), thr)  # log p = ln .002 > ln .001
    assert not is_failure(example_score(LossType.BAD, -math.log(0.0005)), thr)
    assert not is_failure(thr, thr)


def test_balance_threshold_gender():
    thr = TASKS["pronoun_gender_bias"].threshold
    assert example_score(LossType.BALANCE, math.log(4), math.log(2)) == pytest.approx(math.log(2))
    assert is_failure(example_score(LossType.BALANCE, math.log(2), math.log(4)), thr)  # |ln2 - ln4| = ln2 > ln1.5
    assert not is_failure(example_score(LossType.BALANCE, math.log(2), math.log(2.5)), thr)  # ln1.25


def test_good_v_bad_threshold_verb():
    thr = TASKS["verb_conjugation"].threshold
    # p1 = 0.8, p2 = 0.04: NLL1 - NLL2 = ln(0.04/0.8) = ln(1/20) < ln(1/16): success
    assert not is_failure(example_score(LossType.GOOD_V_BAD, -math.log(0.8), -math.log(0.04)), thr)
    # p2 = 0.06: ln(0.075) > ln(0.0625): failure
    assert is_failure(example_score(LossType.GOOD_V_BAD, -math.log(0.8), -math.log(0.06)), thr)
    # sign matters: suffix2 preferred fails
    assert is_failure(example_score(LossType.GOOD_V_BAD, -math.log(0.04), -math.log(0.8)), thr)


# --------------------------------------------------------------------------- losses


def test_token_nll_hand_computed():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(5.0)]])  # p = (1/8, 2/8, 5/8)
    assert float(token_nll(logits, torch.tensor([1]))) == pytest.approx(math.log(4.0), rel=1e-6)
    assert float(token_nll(logits, torch.tensor([2]))) == pytest.approx(math.log(8 / 5), rel=1e-6)


def test_training_losses_are_per_token_means():
    s1, s2 = torch.tensor(3.0), torch.tensor(1.0)
    assert float(training_loss("good", [s1], [2])) == pytest.approx(1.5)
    assert float(training_loss("bad", [s1], [2])) == pytest.approx(-1.5)
    assert float(training_loss("balance", [s1, s2], [2, 4])) == pytest.approx(1.25)  # |1.5 - 0.25|
    assert float(training_loss("balance", [s2, s1], [4, 2])) == pytest.approx(1.25)
    assert float(training_loss("good-v-bad", [s2, s1], [4, 2])) == pytest.approx(0.25 - 1.5)
    with pytest.raises(ValueError):
        training_loss("balance", [s1], [2])


# --------------------------------------------------------------------------- tokenization rules


def test_prefix_and_suffix_tokenized_separately_no_bos(tok):
    sc = encode_prefix_suffix(tok, "The capital of Afghanistan is", " Kabul")
    p = tok.encode("The capital of Afghanistan is", add_special_tokens=False)
    s = tok.encode(" Kabul", add_special_tokens=False)
    assert list(sc.ids) == p + s and sc.start == len(p) and sc.n == len(s)
    assert sc.ids[0] == tok.convert_tokens_to_ids("The")  # no BOS / EOS in front
    assert tok.convert_ids_to_tokens(sc.ids[sc.start]).startswith("Ġ")  # the suffix keeps its leading space
    assert sc.positions == list(range(len(p) - 1, len(p) + len(s) - 1))
    assert sc.targets == s
    # separate tokenization differs from joint tokenization where BPE would merge across the boundary
    sep = encode_prefix_suffix(tok, "Hello", "world")
    assert list(sep.ids) == tok.encode("Hello", add_special_tokens=False) + tok.encode(
        "world", add_special_tokens=False
    )
    assert list(sep.ids) != tok.encode("Helloworld", add_special_tokens=False)


def test_endoftext_literal_is_eos(tok):
    assert encode_text(tok, "<|endoftext|> The") == [50256] + tok.encode(" The", add_special_tokens=False)


def test_eval_scores_sum_over_suffix_tokens_match_naive(tok, tiny):
    """Summed suffix NLL and success through the scorer vs a naive per-example loop on the model's logits."""
    exs = [
        SingleExample("The capital of Afghanistan is", " Kabul", 1),
        SingleExample("The CEO of Accenture is", " Julie Sweet", 2),
    ]
    enc = [encode_example(tok, e) for e in exs]
    got = BackpackScorer(tiny).nll_sums([e.seqs[0] for e in enc])
    for ex, g in zip(exs, got, strict=True):
        p = tok.encode(ex.prefix, add_special_tokens=False)
        s = tok.encode(ex.suffix, add_special_tokens=False)
        with torch.no_grad():
            lp = torch.log_softmax(tiny(torch.tensor([p + s])).logits[0], -1)
        naive = -sum(float(lp[len(p) - 1 + i, t]) for i, t in enumerate(s))
        assert g == pytest.approx(naive, rel=1e-5)
    # success: a threshold between the two sums splits them
    lo, hi = sorted(got)
    assert success_rate(BackpackScorer(tiny), enc, LossType.GOOD, (lo + hi) / 2) == 0.5
    assert success_rate(BackpackScorer(tiny), enc, LossType.GOOD, lo) == 0.5  # equal to threshold: not a failure


@needs_data
def test_pair_task_metrics_naive(tok, tiny):
    data = TaskData.builtin("verb_conjugation", DATA)
    task = EncodedTask.encode(tok, data, 128, max_eval=6, max_train=2)
    m = task_metrics(BackpackScorer(tiny), task)
    ok = 0
    for ex in data.eval[:6]:
        nll = []
        for suf in (ex.suffix1, ex.suffix2):
            p = tok.encode(ex.prefix, add_special_tokens=False)
            s = tok.encode(suf, add_special_tokens=False)
            with torch.no_grad():
                lp = torch.log_softmax(tiny(torch.tensor([p + s])).logits[0], -1)
            nll.append(-sum(float(lp[len(p) - 1 + i, t]) for i, t in enumerate(s)))
        ok += not (nll[0] - nll[1] > math.log(1 / 16))
    assert m["success"] == pytest.approx(ok / 6)
    # hard negatives: mean summed NLL; rest of prompt: per-token mean over all but the first token
    ex = data.hard_neg[0]
    p, s = tok.encode(ex.prefix, add_special_tokens=False), tok.encode(ex.suffix, add_special_tokens=False)
    assert m["n_hard_neg"] == 6 and m["rest_of_prompt"] > 0
    with torch.no_grad():
        lp = torch.log_softmax(tiny(torch.tensor([p + s])).logits[0], -1)
    first = -sum(float(lp[len(p) - 1 + i, t]) for i, t in enumerate(s))
    assert first == pytest.approx(BackpackScorer(tiny).nll_sums([task.hard_neg[0].seqs[0]])[0], rel=1e-5)


# --------------------------------------------------------------------------- readers


@needs_data
def test_reads_all_six_tasks_shapes():
    for name, spec in TASKS.items():
        data = TaskData.builtin(name, DATA)
        assert data.train and data.eval and data.hard_neg and data.unconditional
        kind = PairExample if spec.loss_type.is_pair else SingleExample
        assert all(isinstance(e, kind) for e in data.train + data.eval)
        assert all(isinstance(e, SingleExample) for e in data.hard_neg)
        assert all(isinstance(e, TextExample) for e in data.unconditional)


@pytest.mark.parametrize(
    "lines, line, field",
    [
        (['{"prefix": "a", "suffix": " b"}', '{"prefix": "a"}'], 2, "suffix"),
        (['{"prefix": "a", "suffix": 3}'], 1, "suffix"),
        (['{"prefix": "a", "suffix": " b"}', "", "not json"], 3, None),
        (['{"prefix": "a", "suffix1": " b"}'], 1, "suffix2"),
        (['["a"]'], 1, None),
    ],
)
def test_malformed_records_name_line_and_field(tmp_path, lines, line, field):
    f = tmp_path / "x.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_examples(f)
    assert err.value.line == line and err.value.field == field
    assert f"x.jsonl:{line}" in str(err.value)
    if field:
        assert f"'{field}'" in str(err.value)


def test_shape_mismatch_with_loss_type(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prefix": "a", "suffix": " b"}) + "\n")
    with pytest.raises(DataError, match="suffix1"):
        TaskData.load("mine", "balance", 0.4, f)
