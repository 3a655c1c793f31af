"""Named artefacts from the command line: `train_edits build|report`, `sensepack models|generate --profile`."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ensemble import zoo
from serve.cli import main as sensepack
from train_edits.cli import main as train_edits
from train_edits.report import markdown


def test_build_refuses_unknown_names_and_non_empty_folders(tmp_path):
    r = CliRunner().invoke(train_edits, ["build", "no-such-recipe", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown recipe" in r.output and "sense-smollm2" in r.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    r = CliRunner().invoke(train_edits, ["build", "backpack-smollm2", "--out", str(tmp_path / "full")])
    assert r.exit_code == 2 and "not empty" in r.output


def _report(task, before, after, hn_before, hn_after):
    side = {
        "before": {"success": before, "hard_neg": hn_before, "rest_of_prompt": 3.0},
        "after": {
            "0.001": {"success": after, "hard_neg": hn_after, "rest_of_prompt": 3.0, "beta": 0.5, "g_ratio": 1.0004}
        },
    }
    bp = {"before": dict(side["before"]), "after": {"0.001": dict(side["after"]["0.001"], epoch=3)}}
    return {"task": task, "loss_type": "good", "threshold": 1.6, "backpack": bp, "ensemble": dict(side, target="m")}


def test_report_merges_runs_into_one_table(tmp_path):
    runs = []
    for task, b, a, hb, ha in (("country_capital", 0.10, 0.25, 5.0, 5.5), ("company_ceo", 0.20, 0.24, 4.0, 3.0)):
        d = tmp_path / task
        d.mkdir()
        (d / "report.json").write_text(json.dumps(_report(task, b, a, hb, ha)))
        runs.append(str(d))
    r = CliRunner().invoke(train_edits, ["report", *runs, "--out", str(tmp_path / "merged"), "--stem", "tables"])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "merged" / "tables.md").read_text()
    # Δ success in points: +15.0 and +4.0, average +9.5 (hand-computed); Δ hard negatives +0.500 and −1.000
    assert "| 0.001 | +15.0 | +4.0 | +9.5 |" in md
    assert "| 0.001 | +0.500 | -1.000 | -0.250 |" in md
    assert md == markdown(json.loads((tmp_path / "merged" / "tables.json").read_text()))
    r = CliRunner().invoke(train_edits, ["report", str(tmp_path), "--out", str(tmp_path / "m2")])
    assert r.exit_code == 2 and "report.json: missing" in r.output


def test_models_list_and_fetch_refuse_unknown_names():
    r = CliRunner().invoke(sensepack, ["models", "list", "--json"])
    assert r.exit_code == 0
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert (
        set(rows)
        == set(zoo.REGISTRY)
        >= {
            "smollm2-135m-instruct",
            "backpack-smollm2",
            "sense-smollm2",
            "capitals-smollm2",
        }
    )
    assert rows["capitals-smollm2"]["kind"] == "store" and rows["sense-smollm2"]["kind"] == "sense"
    r = CliRunner().invoke(sensepack, ["models", "fetch", "gpt-7"])
    assert r.exit_code == 2 and "unknown" in r.output
    assert zoo.resolve_path("some/folder") == "some/folder" and not zoo.is_named("EleutherAI/gpt-j-6b")


def test_generate_profiles_are_checked():
    r = CliRunner().invoke(sensepack, ["generate", "--profile", "nope", "x"])
    assert r.exit_code == 1 and "no such profile" in r.output and "smollm2" in r.output
    r = CliRunner().invoke(sensepack, ["generate", "--profile", "demo", "--config", "x.yaml", "x"])
    assert r.exit_code == 2 and "not both" in r.output
    r = CliRunner().invoke(sensepack, ["generate", "--profile", "demo", "--json", "The capital of Mauritius is"])
    assert r.exit_code == 0 and json.loads(r.output.strip().splitlines()[-1])["base"]
