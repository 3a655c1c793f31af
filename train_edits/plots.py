"""PNG plots of a run: G ratio per epoch with the ball lines, success per epoch, β calibration curve."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _symlog_eps(ax, epsilons: Sequence[float]) -> None:
    ax.set_yscale("symlog", linthresh=min(epsilons) / 10 if epsilons else 1e-6)
    for e in epsilons:
        ax.axhline(e, ls="--", lw=0.8, color="gray")
        ax.annotate(f"ε={e:g}", (0, e), textcoords="offset points", xytext=(2, 2), fontsize=7, color="gray")


def plot_g_ratio(history: Sequence[dict], epsilons: Sequence[float], chosen: dict, path: str | Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["g_ratio"] - 1.0 for h in history], marker="o", label="G ratio − 1 (Backpack)")
    _symlog_eps(ax, epsilons)
    for c in chosen.values():
        ax.axvline(c, ls=":", lw=0.8, color="C1")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean NLL_G(edited) / NLL_G(original) − 1")
    ax.set_title("Degradation on G per epoch (dotted: chosen epochs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_success(history: Sequence[dict], path: str | Path) -> None:
    pts = [(h["epoch"], h["success"]) for h in history if h.get("success") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if pts:
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o")
    ax2 = ax.twinx()
    tl = [(h["epoch"], h["train_loss"]) for h in history if h.get("train_loss") is not None]
    if tl:
        ax2.plot([p[0] for p in tl], [p[1] for p in tl], color="C2", ls="--", label="train loss")
        ax2.set_ylabel("training loss", color="C2")
    ax.set_xlabel("epoch")
    ax.set_ylabel("success rate on the eval set (%)")
    ax.set_title("Backpack success per epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_calibration(per_eps: dict, path: str | Path, target: str = "") -> None:
    """per_eps: {eps_str: {"ratios": {beta_str: ratio}, "beta": chosen}}."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epsilons = []
    for i, (e, info) in enumerate(sorted(per_eps.items(), key=lambda kv: float(kv[0]), reverse=True)):
        pts = sorted((float(b), r) for b, r in info["ratios"].items())
        ax.plot([p[0] for p in pts], [p[1] - 1.0 for p in pts], marker="o", color=f"C{i}", label=f"edits for ε={e}")
        ax.axvline(info["beta"], ls=":", color=f"C{i}", lw=0.8)
        epsilons.append(float(e))
    _symlog_eps(ax, epsilons)
    ax.set_xlabel("β")
    ax.set_ylabel("ensemble G loss / large model's − 1")
    ax.set_title(f"β calibration {target}".strip())
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
