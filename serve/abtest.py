"""Ball checks through the serving path (DESIGN §4): the activation gate and
the live A/B monitor.

Both measure paired losses: the same token rows scored under the base model
(β = 0) and under the pack from the same logits, through the engine's scorer
(serve.scoring: the embedded ensemble's jobs, or forced decoding in the serving
vLLM engine), so kernel non-determinism can neither fake nor hide a breach.

**Gate.** Before a pack version becomes routable, its ball ratio
``Σ NLL_pack / Σ NLL_base`` (micro-averaged per token, first token of each text
not scored) on the configured general corpus G, at its calibrated β for the
served model, must be ≤ 1+ε (ε: ``gate.epsilon`` or the pack's calibration).

**Live.** A configurable share of traffic (``ab.traffic_share``) is split into
arms by a sticky hash of the request's ``ab_key``: the control arm is served by
the base model, the treatment arm with the pack. Sampled finished requests
(``ab.sample_rate``) are re-scored under both arms in the engine's
low-priority lane. The scored text is the prompt, plus the completion for
control-arm requests (a treatment completion was sampled from the pack and
would bias the ratio toward it). The running ratio B/A = Σ NLL_pack / Σ NLL_base
and its confidence interval (delta method for a ratio of means) are exported
per pack; when the whole interval lies above 1+ε (after ``ab.min_samples``)
the pack is flagged and, with ``ab.auto_disable``, disabled (its routes fall
back to the previous version or to the base model).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import NormalDist

from ensemble.jsonl import DataError, iter_jsonl
from serve.pack_cache import GateResult, Resident
from serve.packs import sticky_fraction
from serve.scoring import Scorer

log = logging.getLogger("sensepack.abtest")

BUILTIN_CORPUS = Path(__file__).resolve().parent / "data" / "gate_corpus.txt"


def read_corpus(path: Path | None, text_field: str = "text", max_texts: int = 64) -> list[str]:
    """Texts from a .jsonl (field `text_field`), or a .txt with one text per non-empty line."""
    path = Path(path) if path is not None else BUILTIN_CORPUS
    texts: list[str] = []
    if not path.is_file():
        raise ValueError(f"gate.corpus: no such file: {path}")
    if path.suffix == ".jsonl":
        for lineno, rec in iter_jsonl(path):  # DataError (a ValueError) names the line
            t = rec.get(text_field)
            if not isinstance(t, str):
                raise DataError(path, lineno, text_field, "gate.corpus: missing or not a string")
            texts.append(t)
            if len(texts) >= max_texts:
                break
    else:
        with open(path, encoding="utf-8") as f:
            texts = list(itertools.islice((s for s in map(str.strip, f) if s), max_texts))
    if not texts:
        raise ValueError(f"gate.corpus {path}: no texts")
    return texts


class Gate:
    def __init__(self, scorer: Scorer, tokenizer, gate_cfg):
        self.scorer = scorer
        self.cfg = gate_cfg
        texts = read_corpus(gate_cfg.corpus, gate_cfg.text_field, gate_cfg.max_texts)
        rows = []
        for t in texts:
            ids = tokenizer(t, add_special_tokens=False)["input_ids"][: gate_cfg.max_tokens_per_text]
            if len(ids) >= 2:
                rows.append(list(ids))
        if not rows:
            raise ValueError("gate.corpus: no text has 2 or more tokens")
        self.rows = rows
        self.tokens = sum(len(r) - 1 for r in rows)
        # what the verdict depends on besides the pack and the model: the scored token rows
        self.fingerprint: str | None = "sha256:" + hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def __call__(self, r: Resident, deadline: float | None = None) -> GateResult:
        """The verdict; with `deadline` (time.monotonic()), TimeoutError once it passes (between batches)."""
        beta = r.calibrated_beta
        pack_ref = r.pack_ref(beta)
        base_sum = packed_sum = 0.0
        bs = self.cfg.batch_size
        for i in range(0, len(self.rows), bs):
            batch = self.rows[i : i + bs]
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("gate: deadline exceeded")
            job = self.scorer.paired_nll(batch, pack_ref, high=True)
            try:
                a, b = job.result(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                job.cancel()
                raise
            base_sum += sum(a)
            packed_sum += sum(b)
        ratio = packed_sum / base_sum if base_sum > 0 else float("inf")
        passed = ratio <= 1.0 + r.epsilon
        log.info(
            "gate measured",
            extra={
                "event": "gate",
                "pack": r.ref,
                "ratio": ratio,
                "epsilon": r.epsilon,
                "beta": beta,
                "tokens": self.tokens,
                "passed": passed,
            },
        )
        return GateResult(passed, ratio, r.epsilon, beta, self.tokens)


@dataclass
class PairedMoments:
    """Streaming sums of paired samples (a_i, b_i), O(1) memory and time per sample (Welford):

        n, mean_a, mean_b,  M_aa = Σ(a - ā)²,  M_bb = Σ(b - b̄)²,  M_ab = Σ(a - ā)(b - b̄)

    With r = b̄/ā the residuals d_i = b_i - r·a_i have mean 0, so
    Σ(d_i - d̄)² = M_bb - 2r·M_ab + r²·M_aa: the batch formula of `ratio_ci`
    without keeping the samples.
    """

    n: int = 0
    mean_a: float = 0.0
    mean_b: float = 0.0
    m_aa: float = 0.0
    m_bb: float = 0.0
    m_ab: float = 0.0

    def add(self, a: float, b: float) -> None:
        self.n += 1
        da = a - self.mean_a
        db = b - self.mean_b
        self.mean_a += da / self.n
        self.mean_b += db / self.n
        self.m_aa += da * (a - self.mean_a)
        self.m_bb += db * (b - self.mean_b)
        self.m_ab += da * (b - self.mean_b)

    def ratio_ci(self, confidence: float) -> tuple[float, float, float]:
        """Σb/Σa and its delta-method interval (same as `ratio_ci` on the samples)."""
        n = self.n
        if n == 0 or self.mean_a <= 0:
            return float("nan"), float("nan"), float("nan")
        r = self.mean_b / self.mean_a
        if n < 2:
            return r, float("-inf"), float("inf")
        ss = max(self.m_bb - 2 * r * self.m_ab + r * r * self.m_aa, 0.0)
        se = math.sqrt(ss / (n - 1) / n) / self.mean_a
        z = NormalDist().inv_cdf(0.5 + confidence / 2)
        return r, r - z * se, r + z * se


@dataclass
class ArmStats:
    version: str
    epsilon: float
    moments: PairedMoments = field(default_factory=PairedMoments)  # (base NLL, pack NLL) per sample
    tokens: int = 0
    breached: bool = False
    disabled: bool = False
    ratio: float = float("nan")
    lower: float = float("nan")
    upper: float = float("nan")

    @property
    def samples(self) -> int:
        return self.moments.n


def ratio_ci(a: list[float], b: list[float], confidence: float) -> tuple[float, float, float]:
    """Ratio of means Σb/Σa and its delta-method confidence interval."""
    n = len(a)
    sa, sb = sum(a), sum(b)
    if n == 0 or sa <= 0:
        return float("nan"), float("nan"), float("nan")
    r = sb / sa
    if n < 2:
        return r, float("-inf"), float("inf")
    mean_a = sa / n
    d = [bi - r * ai for ai, bi in zip(a, b, strict=True)]
    mean_d = sum(d) / n
    var = sum((x - mean_d) ** 2 for x in d) / (n - 1)
    se = math.sqrt(var / n) / mean_a
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return r, r - z * se, r + z * se


class LiveMonitor:
    def __init__(self, ab_cfg, metrics, scorer: Scorer | None, seed: int | None = None):
        self.cfg = ab_cfg
        self.metrics = metrics
        self.scorer = scorer
        self._breach_listeners: list = []  # auto-disable: the pack manager's, registered by it
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when no sample is pending
        self._stats: dict[tuple[str, str], ArmStats] = {}  # (pack, version) -> its live record
        self._rng = random.Random(seed)
        self._pending = 0

    # ---- traffic split (called at admission)
    def assign(self, pack: str, key: str) -> tuple[str, bool]:
        if not self.cfg.enabled or self.cfg.traffic_share <= 0 or not key:
            return "pack", False
        if sticky_fraction(self.cfg.salt, "share", pack, key) >= self.cfg.traffic_share:
            return "pack", False
        arm = "base" if sticky_fraction(self.cfg.salt, "arm", pack, key) < self.cfg.control_share else "pack"
        return arm, True

    # ---- sampling (called when a request finishes, in the engine thread)
    def on_finished(self, pins, prompt_ids: list[int], output_ids: list[int]) -> None:
        if not self.cfg.enabled:
            return
        for pin in pins:
            if not pin.in_experiment or pin.resident is None:
                continue
            with self._lock:
                if self._pending >= self.cfg.max_pending or self._rng.random() >= self.cfg.sample_rate:
                    continue
                self._pending += 1
            row = list(prompt_ids) + (list(output_ids) if pin.arm == "base" else [])
            self._score(pin.resident, row)

    def _score(self, r: Resident, row: list[int]) -> None:
        """Re-score one sample in the low-priority lane; recorded when the scorer is done."""
        if len(row) < 2 or r.state in ("freed", "disabled") or self.scorer is None:
            self._done()  # a disabled version's verdict is final
            return
        try:
            job = self.scorer.paired_nll([row], r.pack_ref(r.calibrated_beta), high=False)
        except BaseException:
            self._done()
            raise

        def recorded(f) -> None:
            try:
                if f.cancelled() or f.exception() is not None:
                    log.warning("A/B sample not scored", extra={"event": "ab_score_failed", "pack": r.ref})
                elif r.state not in ("freed", "disabled"):  # queued samples of a disabled version are dropped
                    a, b = f.result()
                    self.record(r, a[0], b[0], len(row) - 1)
            finally:
                self._done()

        job.future.add_done_callback(recorded)

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1
            if self._pending == 0:
                self._idle.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every sample taken so far is scored and recorded; True when none is pending."""
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout)

    def record(self, r: Resident, nll_base: float, nll_pack: float, tokens: int) -> None:
        eps = self.cfg.epsilon if self.cfg.epsilon is not None else r.epsilon
        with self._lock:
            if getattr(r, "state", None) == "freed":  # left memory while being scored: its record is gone
                return
            st = self._stats.get((r.name, r.version))
            if st is None:
                st = self._stats[(r.name, r.version)] = ArmStats(r.version, eps)
            st.moments.add(nll_base, nll_pack)
            st.tokens += tokens
            st.ratio, st.lower, st.upper = st.moments.ratio_ci(self.cfg.confidence)
            n = st.samples
            breach = not st.breached and n >= self.cfg.min_samples and st.lower > 1.0 + eps
            if breach:
                st.breached = True
            m = self.metrics
            # under the lock: `forget` (which removes these series) cannot interleave and leave a stale one
            if math.isfinite(st.ratio):
                m.ab_ratio.labels(r.name, r.version).set(st.ratio)
            if math.isfinite(st.lower) and math.isfinite(st.upper):
                m.ab_ci_lower.labels(r.name, r.version).set(st.lower)
                m.ab_ci_upper.labels(r.name, r.version).set(st.upper)
        m.ab_samples.labels(r.name).inc()
        if breach:
            m.ab_breaches.labels(r.name).inc()
            log.error(
                "live ball breach",
                extra={
                    "event": "ab_breach",
                    "pack": r.ref,
                    "ratio": st.ratio,
                    "ci_lower": st.lower,
                    "ci_upper": st.upper,
                    "epsilon": eps,
                    "samples": n,
                },
            )
            if self.cfg.auto_disable and self._breach_listeners:
                reason = f"live ball breach: ratio {st.ratio:.6f}, CI [{st.lower:.6f}, {st.upper:.6f}] > 1+{eps:g}"
                moved = [m for fn in list(self._breach_listeners) for m in fn(r.name, r.version, reason)]
                st.disabled = True
                m.auto_disables.labels(r.name).inc()
                log.error("pack auto-disabled", extra={"event": "pack_auto_disabled", "pack": r.ref, "routes": moved})

    def on_breach(self, callback) -> None:
        """callback(pack, version, reason) -> moved routes: called on a confirmed breach with ab.auto_disable."""
        self._breach_listeners.append(callback)

    def reset(self, pack: str, version: str) -> None:
        """A re-enabled version starts a fresh live record."""
        with self._lock:
            self._stats.pop((pack, version), None)
            self.metrics.drop_version(pack, version)

    def forget(self, pack: str, version: str) -> None:
        """Drop the record of a version that left memory (records stay bounded by packs.max_resident);
        a breach stays for ABReport (the pack manager keeps disabled versions' records too)."""
        with self._lock:
            st = self._stats.get((pack, version))
            if st is not None and st.breached:
                return
            self._stats.pop((pack, version), None)
            self.metrics.drop_version(pack, version)

    def report(self) -> dict[tuple[str, str], ArmStats]:
        with self._lock:
            return {k: replace(v, moments=replace(v.moments)) for k, v in self._stats.items()}
