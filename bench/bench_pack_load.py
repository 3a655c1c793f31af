"""Benchmark: load and fully validate a 10,000-sense edit pack (d = 768) from a local store.

Measures, over repeated runs (median / p90 / min, milliseconds):
  store.load       resolve ``name@prod`` + bounded read + sha256 + every validation check + compatibility/β checks
  store.load signed  the same with ``Expectations.trusted_keys`` set: the ed25519 signature is verified too
  read_pack        the same without the store (a folder path)
  resident         store.load and wrapping the tensors as the ensemble core's SenseEdits (float32, CPU),
                   i.e. ready to hand to ``Ensemble``/``DeltaTracker``
  components       reading the file, sha256 alone, and a naive baseline (safetensors.load_file + a separate
                   sha256 pass + torch.isfinite), to show where the time goes
Each is measured warm (file in the page cache, the usual case right after publish or on a busy host) and
cold (page cache dropped for the pack files with posix_fadvise(DONTNEED) before every run).

Run:  .venv/bin/python bench/bench_pack_load.py [--senses 10000] [--d 768] [--repeats 30]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edits_store import CalibrationEntry, Expectations, PackContents, build_pack, open_store, read_pack
from ensemble.edits import SenseEdits

TARGET_MS = 50.0
VOCAB, SENSES = 50264, 16
BACKPACK_FP, TOKENIZER_FP, TARGET_FP = "sha256:" + "b" * 64, "sha256:" + "7" * 64, "sha256:" + "9" * 64


def make_pack(n: int, d: int) -> PackContents:
    g = torch.Generator().manual_seed(0)
    keys = torch.randperm(50257 * SENSES, generator=g)[:n]
    deltas = torch.randn(n, d, generator=g) * 0.01
    cal = CalibrationEntry(
        target_model="EleutherAI/gpt-j-6b",
        target_fingerprint=TARGET_FP,
        beta=2.0,
        ball_ratio=1.00009,
        g_fingerprint="sha256:" + "6" * 64,
        g_tokens=100_000,
        epsilon=1e-4,
    )
    return build_pack(
        "bench",
        keys // SENSES,
        keys % SENSES,
        deltas,
        backpack_name="stanfordnlp/backpack-gpt2",
        backpack_fingerprint=BACKPACK_FP,
        tokenizer_fingerprint=TOKENIZER_FP,
        vocab_size=VOCAB,
        num_senses=SENSES,
        epsilon=1e-4,
        calibration=[cal],
        training={"task": "bench"},
    )


def drop_cache(folder: Path) -> None:
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(
    fn: Callable[[], object], repeats: int, before: Callable[[], object] | None = None
) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU time (all threads) per call, in ms. CPU time shows the work itself when the
    host is shared and wall time is inflated by waiting for a core."""
    fn()  # warm-up (imports, allocator)
    wall, cpu = [], []
    for _ in range(repeats):
        if before is not None:
            before()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu.append((time.process_time() - c0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    return wall, cpu


def summary(ms: list[float]) -> tuple[float, float, float]:
    ordered = sorted(ms)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], ordered[0]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senses", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dir", default=None, help="store directory (default: a temp dir under /tmp)")
    args = parser.parse_args()

    workdir = Path(args.dir or tempfile.mkdtemp(prefix="bench-packs-"))
    store = open_store(workdir)
    pack = make_pack(args.senses, args.d)
    from edits_store.signing import generate_key, load_private_key, public_raw

    private_pem, public_pem = generate_key()
    version = store.publish(pack, signing_key=load_private_key(private_pem))
    store.set_alias("bench", "prod", version)
    folder = workdir / "bench" / version
    tensor_file = folder / "senses.safetensors"
    size_mb = tensor_file.stat().st_size / 2**20
    expect = Expectations(
        backpack_fingerprint=BACKPACK_FP,
        tokenizer_fingerprint=TOKENIZER_FP,
        vocab_size=VOCAB,
        num_senses=SENSES,
        d_model=args.d,
        target_fingerprint=TARGET_FP,
    )

    signed_expect = Expectations(**{**expect.__dict__, "trusted_keys": (public_raw(public_pem),)})

    def load() -> PackContents:
        return store.load("bench@prod", expect)

    def load_signed() -> PackContents:
        return store.load("bench@prod", signed_expect)

    def resident() -> tuple[SenseEdits, float]:
        p = store.load("bench@prod", expect)
        beta = p.manifest.beta_for(TARGET_FP).beta
        edits = SenseEdits(p.token_ids, p.sense_ids, p.deltas).to("cpu", torch.float32)
        return edits, beta

    def read_bytes() -> bytes:
        return tensor_file.read_bytes()

    in_memory = tensor_file.read_bytes()

    def sha_only() -> str:
        return hashlib.sha256(in_memory).hexdigest()

    def naive() -> tuple[str, bool]:
        from safetensors.torch import load_file

        digest = hashlib.sha256(tensor_file.read_bytes()).hexdigest()
        tensors = load_file(str(tensor_file))
        return digest, bool(torch.isfinite(tensors["deltas"]).all())

    cases = [
        ("store.load (full validation)", load),
        ("store.load signed (+ ed25519 verify)", load_signed),
        ("read_pack (folder)", lambda: read_pack(folder, expect=expect)),
        ("resident (load + SenseEdits)", resident),
        ("  read file bytes", read_bytes),
        ("  sha256 alone (in memory)", sha_only),
        ("  naive: load_file + sha256 + isfinite", naive),
    ]

    print(f"pack: {args.senses} senses x d={args.d}, senses.safetensors {size_mb:.1f} MiB, version {version}")
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"(threads {torch.get_num_threads()}), python {platform.python_version()}"
    )
    print(f"ensemble.edits.SenseEdits: {'yes' if SenseEdits is not None else 'not importable, tensors only'}")
    print("load average at start (1/5/15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    results = {}
    for mode, before in (("warm", None), ("cold", lambda: drop_cache(folder))):
        print(f"\n[{mode} page cache] {args.repeats} runs each, ms: wall median / p90 / min | CPU median")
        for label, fn in cases:
            if label.startswith("  sha256") and mode == "cold":
                continue
            wall, cpu = timed(fn, args.repeats, before)
            med, p90, best = summary(wall)
            results[(mode, label)] = med
            print(f"  {label:<42s} {med:8.2f} {p90:8.2f} {best:8.2f} | {statistics.median(cpu):8.2f}")
    full = max(
        results[("warm", "store.load (full validation)")], results[("warm", "store.load signed (+ ed25519 verify)")]
    )
    warm = {label: ms for (mode, label), ms in results.items() if mode == "warm"}
    ratios = [
        (f"slower of store.load, signed / {TARGET_MS:.0f} ms target", full / TARGET_MS),
        ("store.load / naive sequential baseline", full / warm["  naive: load_file + sha256 + isfinite"]),
        ("store.load / sha256 alone", full / warm["  sha256 alone (in memory)"]),
        ("resident / store.load", warm["resident (load + SenseEdits)"] / full),
        ("cold store.load / warm store.load", results[("cold", "store.load (full validation)")] / full),
    ]
    print("\nratios (warm, medians):")
    for label, value in ratios:
        print(f"  {label:<44s} {value:6.2f}")
    print("load average at end (1/5/15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    verdict = "PASS" if full < TARGET_MS else "MISS"
    print(f"\ntarget: < {TARGET_MS:.0f} ms warm, hashes checked: {verdict} ({full:.1f} ms)")


if __name__ == "__main__":
    main()
