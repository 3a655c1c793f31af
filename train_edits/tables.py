"""Tables 3 and 4 across tasks, methods and seeds: mean ± standard error (the paper's test protocol).

Input: the ``report.json`` of many runs (one task, one method, one seed each; ``train_edits protocol``
writes them as ``DIR/<method>/seed-<s>/``). For every (side, method, task, ε) the per-seed change
after − before of a metric is averaged over the seeds:

    mean = (1/n) Σ_i x_i        SE = sd / √n,  sd² = Σ_i (x_i − mean)² / (n − ddof)   (n = 1: no SE)

as upstream's test protocol (10 seeds per task and ball, ``configs/test/make_test.py:27``) and its
report (``plotting/report_test_backpack.py:62``: ``np.std(...) / np.sqrt(n)``, numpy's default
ddof = 0). ``ddof=1`` (``table --sample-sd``) uses the unbiased sample variance instead. The "Avg"
column is the mean of the task means, with SE √(Σ_t SE_t²) / T (tasks independent). Side ``backpack``
is Table 3 (the Backpack: sense finetuning, full finetuning, LoRA); side ``ensemble`` is Table 4 (the
large model: the sense-finetuned ensemble, full finetuning and
LoRA of the large model).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from .report import eps_key
from .tasks import TABLE_NAMES

METRICS = {
    "success": (100.0, 1, "Δ success rate (points, after − before)"),
    "hard_neg": (1.0, 3, "Δ hard-negative NLL (nats, lower is better)"),
    "rest_of_prompt": (1.0, 3, "Δ rest-of-prompt NLL (nats/token)"),
}
SIDES = {"backpack": "Table 3: the Backpack", "ensemble": "Table 4: the large model"}
METHOD_ORDER = ["full-backpack", "lora-backpack", "full-large", "lora-large", "senses"]


def mean_se(values: Sequence[float], ddof: int = 0) -> tuple[float, float | None]:
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None
    var = sum((x - m) ** 2 for x in values) / (n - ddof)
    return m, math.sqrt(var / n)


def find_reports(paths: Iterable[str | Path]) -> list[dict]:
    """report.json of each folder; a folder without one is searched below (protocol dirs). A folder given
    that holds no report at any depth is an error; below it, unfinished runs (no report yet) are skipped."""
    out = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: not a run directory")
        found = _reports_below(p)
        if not found:
            raise FileNotFoundError(
                f"{p / 'report.json'}: missing (and none below); run `train_edits eval "
                f"--run-dir {p}` or `train_edits protocol` first"
            )
        out += found
    return out


def _reports_below(p: Path) -> list[dict]:
    f = p / "report.json"
    if f.is_file():
        data = json.loads(f.read_text())
        return data if isinstance(data, list) else [data]
    return [r for sub in sorted(x for x in p.iterdir() if x.is_dir()) for r in _reports_below(sub)]


def aggregate(reports: Sequence[dict], ddof: int = 0) -> list[dict]:
    """One row per (side, method, task, ε, metric): n, mean, SE and the per-seed values."""
    cells: dict[tuple, dict] = {}
    for r in reports:
        method = r.get("method", "senses")
        for side in SIDES:
            s = r.get(side)
            if not s:
                continue
            for e, a in s["after"].items():
                for metric in METRICS:
                    b = s["before"].get(metric)
                    if a.get(metric) is None or b is None:
                        continue
                    key = (side, method, r["task"], eps_key(float(e)), metric)
                    c = cells.setdefault(key, {"values": [], "seeds": []})
                    c["values"].append(a[metric] - b)
                    c["seeds"].append(r.get("seed"))
    rows = []
    for (side, method, task, e, metric), c in cells.items():
        m, se = mean_se(c["values"], ddof)
        rows.append(
            {
                "side": side,
                "method": method,
                "task": task,
                "epsilon": e,
                "metric": metric,
                "n": len(c["values"]),
                "mean": m,
                "se": se,
                "values": c["values"],
                "seeds": c["seeds"],
            }
        )
    return rows


def _order(rows):
    methods = sorted({r["method"] for r in rows}, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))
    tasks = sorted({r["task"] for r in rows}, key=lambda t: (list(TABLE_NAMES).index(t) if t in TABLE_NAMES else 99, t))
    eps = sorted({r["epsilon"] for r in rows}, key=float, reverse=True)
    return methods, tasks, eps


def _cell(mean, se, scale, digits):
    if mean is None:
        return "–"
    s = f"{scale * mean:+.{digits}f}"
    return s + (f" ± {scale * se:.{digits}f}" if se is not None else "")


def markdown(rows: Sequence[dict]) -> str:
    out = ["# Tables 3 and 4: mean ± standard error over seeds", ""]
    for side, title in SIDES.items():
        srows = [r for r in rows if r["side"] == side]
        if not srows:
            continue
        methods, tasks, eps = _order(srows)
        idx = {(r["method"], r["task"], r["epsilon"], r["metric"]): r for r in srows}
        ns = sorted({r["n"] for r in srows})
        out += [f"## {title}", "", f"Seeds per cell: {', '.join(map(str, ns))}.", ""]
        for metric, (scale, digits, label) in METRICS.items():
            if not any(r["metric"] == metric for r in srows):
                continue
            out += [
                f"{label}:",
                "",
                "| method | ε | " + " | ".join(TABLE_NAMES.get(t, t) for t in tasks) + " | Avg |",
                "|---|---|" + "---|" * (len(tasks) + 1),
            ]
            for m in methods:
                for e in eps:
                    cs = [idx.get((m, t, e, metric)) for t in tasks]
                    if not any(cs):
                        continue
                    got = [c for c in cs if c]
                    avg = sum(c["mean"] for c in got) / len(got)
                    ses = [c["se"] for c in got]
                    avg_se = math.sqrt(sum(x * x for x in ses)) / len(got) if all(x is not None for x in ses) else None
                    n = "/".join(str(x) for x in sorted({c["n"] for c in got}))  # seeds behind the row
                    cells = " | ".join(_cell(c["mean"], c["se"], scale, digits) if c else "–" for c in cs)
                    out.append(f"| {m} (n={n}) | {e} | {cells} | {_cell(avg, avg_se, scale, digits)} |")
            out.append("")
    return "\n".join(out) + "\n"


def plot(rows: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["metric"] == "success"]
    sides = [s for s in SIDES if any(r["side"] == s for r in rows)]
    if not sides:
        return
    methods, tasks, _ = _order(rows)
    fig, axes = plt.subplots(len(sides), len(tasks), figsize=(3.2 * len(tasks), 2.8 * len(sides)), squeeze=False)
    for i, side in enumerate(sides):
        for j, t in enumerate(tasks):
            ax = axes[i][j]
            for m in methods:
                pts = sorted(
                    (float(r["epsilon"]), 100 * r["mean"], 100 * (r["se"] or 0.0))
                    for r in rows
                    if r["side"] == side and r["method"] == m and r["task"] == t
                )
                if pts:
                    ax.errorbar(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        yerr=[p[2] for p in pts],
                        marker="o",
                        capsize=3,
                        label=m,
                    )
            ax.set_xscale("log")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_title(f"{TABLE_NAMES.get(t, t)} ({'Backpack' if side == 'backpack' else 'large model'})", fontsize=9)
            ax.set_xlabel("ε")
            if j == 0:
                ax.set_ylabel("Δ success (points)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables(reports: Sequence[dict], folder: str | Path, stem: str = "tables", ddof: int = 0) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = aggregate(reports, ddof)
    paths = {"json": folder / f"{stem}.json", "markdown": folder / f"{stem}.md", "plot": folder / f"{stem}.png"}
    paths["json"].write_text(json.dumps({"rows": rows, "runs": len(reports), "se_ddof": ddof}, indent=1))
    paths["markdown"].write_text(markdown(rows))
    plot(rows, paths["plot"])
    return paths
