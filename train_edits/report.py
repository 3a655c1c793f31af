"""Reports: JSON per task and Markdown tables in the layout of the paper's Tables 3 and 4.

Table 3 (Backpack) and Table 4 (ensemble with a large model) list, per
degradation ball ε (rows) and task (columns), the change in success rate
(after − before, percentage points) of the edit chosen for that ball; a
second table gives the change in hard-negative mean summed NLL (lower is
better), and a detail table gives every number.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .tasks import TABLE_NAMES


def eps_key(eps: float) -> str:
    return f"{eps:g}"


def _delta(after, before, scale=1.0):
    if after is None or before is None:
        return None
    return (after - before) * scale


def _fmt(x, digits=1, signed=True):
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _table(reports: Sequence[dict], side: str, metric: str, scale: float, digits: int) -> list[str]:
    tasks = [r for r in reports if r.get(side)]
    if not tasks:
        return []
    names = [TABLE_NAMES.get(r["task"], r["task"]) for r in tasks]
    epsilons = sorted({e for r in tasks for e in r[side]["after"]}, key=float, reverse=True)
    lines = ["| ε | " + " | ".join(names) + " | Avg |", "|---|" + "---|" * (len(names) + 1)]
    for e in epsilons:
        cells = []
        for r in tasks:
            a = r[side]["after"].get(e)
            cells.append(_delta(a.get(metric) if a else None, r[side]["before"].get(metric), scale))
        vals = [c for c in cells if c is not None]
        avg = sum(vals) / len(vals) if vals else None
        lines.append(f"| {e} | " + " | ".join(_fmt(c, digits) for c in cells) + f" | {_fmt(avg, digits)} |")
    return lines


def markdown(reports: Sequence[dict]) -> str:
    out = ["# Edit evaluation", ""]
    for side, title in (
        ("backpack", "Backpack alone (layout of the paper's Table 3)"),
        ("ensemble", "Ensemble with the large model (layout of the paper's Table 4)"),
    ):
        t = _table(reports, side, "success", 100.0, 1)
        if not t:
            continue
        target = next((r[side].get("target") for r in reports if r.get(side)), None)
        out += (
            [
                f"## {title}" + (f": {target}" if target and side == "ensemble" else ""),
                "",
                "Δ success rate (percentage points, after − before) per degradation ball:",
                "",
            ]
            + t
            + [""]
        )
        h = _table(reports, side, "hard_neg", 1.0, 3)
        if h:
            out += ["Δ hard-negative mean summed NLL (nats, lower is better):", ""] + h + [""]
    out += [
        "## Details",
        "",
        "| task | method | side | ε | epoch / β | success before → after | hard neg before → after | "
        "rest-of-prompt before → after | G ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        for side in ("backpack", "ensemble"):
            s = r.get(side)
            if not s:
                continue
            b = s["before"]
            for e, a in sorted(s["after"].items(), key=lambda kv: float(kv[0]), reverse=True):
                sel = f"β = {a['beta']:g}" if "beta" in a else f"epoch {a['epoch']}"
                out.append(
                    f"| {r['task']} | {r.get('method', 'senses')} | {side} | {e} | {sel} | "
                    f"{_fmt(100 * b['success'], 1, False)}% → "
                    f"{_fmt(100 * a['success'], 1, False)}% | {_fmt(b.get('hard_neg'), 3, False)} → "
                    f"{_fmt(a.get('hard_neg'), 3, False)} | {_fmt(b.get('rest_of_prompt'), 3, False)} → "
                    f"{_fmt(a.get('rest_of_prompt'), 3, False)} | {a['g_ratio']:.7f} |"
                )
    fluent = [
        (r, e, a)
        for r in reports
        if r.get("ensemble")
        for e, a in sorted(r["ensemble"]["after"].items(), key=lambda kv: float(kv[0]), reverse=True)
        if "fluency" in a and "fluency" in r["ensemble"]["before"]
    ]
    if fluent:
        out += [
            "",
            "## Fluency (ensemble, greedy continuations of the eval prompts)",
            "",
            "| task | ε | β | prompts × tokens | repeated 3-grams before → after | continuations with a repeat |",
            "|---|---|---|---|---|---|",
        ]
        for r, e, a in fluent:
            fb, fa = r["ensemble"]["before"]["fluency"], a["fluency"]
            out.append(
                f"| {r['task']} | {e} | {a.get('beta', 0):g} | {fa['prompts']} × {fa['max_new_tokens']} | "
                f"{fb['repeated_ngram_rate']:.3f} → {fa['repeated_ngram_rate']:.3f} | "
                f"{100 * fb['with_repeat']:.0f}% → {100 * fa['with_repeat']:.0f}% |"
            )
    return "\n".join(out) + "\n"


def write_reports(reports: Sequence[dict], folder: str | Path, stem: str = "report") -> tuple[Path, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    js = folder / f"{stem}.json"
    md = folder / f"{stem}.md"
    js.write_text(json.dumps(list(reports) if len(reports) != 1 else reports[0], indent=1))
    md.write_text(markdown(reports))
    return js, md
