"""A store of 10,000 packs, local and on S3 (moto), with a real server over it: listing and resolving at that
size, the subscription listing only the names a server serves, requests naming packs anywhere in it loading on
demand within the residency budget, an alias move reaching a route."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tqdm import tqdm

from edits_store.store import open_store
from ensemble.edits import SenseEdits
from sensepack_testing.serve import demo_served, running_server, wait_until
from serve.client import Client
from serve.models import pack_from_edits
from tests.test_store_fixtures import S3_CREDENTIALS, make_bucket, moto_endpoint

pytestmark = pytest.mark.slow
N = 10_000
PROMPT = "We flew to Mauritius"


def name(i: int) -> str:
    return f"team{i % 10}-pack{i:05d}"


def edits(i: int, d: int) -> SenseEdits:
    """Two sense rows on " Mauritius"-independent tokens, different per pack."""
    g = torch.Generator().manual_seed(i)
    tok = torch.tensor([300 + i % 5000, 5301 + i % 5000])
    return SenseEdits(tok, torch.tensor([i % 4, (i + 1) % 4]), torch.randn(2, d, generator=g) * 0.01)


@pytest.fixture(scope="module")
def local_10k(tmp_path_factory):
    """10,000 packs for the demo pairing, published through the store (4 writer threads); name -> version."""
    served = demo_served()
    root = tmp_path_factory.mktemp("store-10k")
    store = open_store(str(root))
    d = served.backpack.config.n_embd
    packs = [pack_from_edits(name(i), edits(i, d), served, beta=1.0, epsilon=1.0) for i in range(N)]
    with ThreadPoolExecutor(4) as ex:
        versions = list(tqdm(ex.map(store.publish, packs), total=N, desc="publish 10,000 packs", disable=True))
    return root, {p.manifest.name: v for p, v in zip(packs, versions, strict=True)}


def _check_store_at_size(store, versions: dict[str, str]) -> None:
    assert store.list_packs() == sorted(versions)
    rng = random.Random(0)
    for n in rng.sample(sorted(versions), 50):
        assert store.resolve(n) == (n, versions[n])
    sample = rng.sample(sorted(versions), 3)
    for n in sample:
        assert store.load(n).version == versions[n]  # every check of a load, at this size too
    served = rng.sample(sorted(versions), 100)
    full = store.backend.scan()
    assert len(full) == N
    assert store.backend.scan(served) == {n: full[n] for n in served}  # S3: 100 of 10,000 listed by name
    assert store.backend.scan(sorted(versions)[:2000]) == {n: full[n] for n in sorted(versions)[:2000]}


def test_local_store_of_10000(local_10k):
    root, versions = local_10k
    _check_store_at_size(open_store(str(root)), versions)


def test_s3_store_of_10000(local_10k):
    """The same tree in a moto S3 bucket (the layout is the backends' common one): listing, resolving, loading
    and the served-names scan there, by name and whole."""
    root, versions = local_10k
    endpoint = moto_endpoint()
    url = f"s3://{make_bucket(endpoint)}/packs"
    store = open_store(url, endpoint_url=endpoint, **S3_CREDENTIALS)
    # moto on 2 cores takes ~15 ms per PUT over HTTP (10 minutes for this tree): the objects go straight into
    # the in-process moto server's bucket; every read below goes through S3's HTTP API as in production.
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    bucket, prefix = url[5:].split("/", 1)
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and not rel.parts[0].startswith("."):  # .staging, .trash, .lock: local only
            backend.put_object(bucket, f"{prefix}/{rel.as_posix()}", p.read_bytes())
    _check_store_at_size(store, versions)


def test_server_over_10000_packs(local_10k):
    """Requests name 1-3 packs drawn from all 10,000: each loads on demand, the server keeps at most
    max_resident versions, the subscription watches only what it serves, and an alias move on a served pack
    reaches its route."""
    root, versions = local_10k
    store = open_store(str(root))
    overrides = {"packs.max_resident": 20, "store.poll_interval_s": 0.2}
    with running_server(root, demo_served(), **overrides) as server:
        c = Client(f"127.0.0.1:{server.port}", token="test-admin-token")
        rng = random.Random(1)
        for _ in range(25):
            refs = rng.sample(sorted(versions), rng.randint(1, 3))
            out = c.generate(PROMPT, packs=refs, max_new_tokens=2)
            assert [(p.name, p.version) for p in out.packs] == [(r, versions[r]) for r in refs]
            assert len(server.packs.residents()) <= 20
        watched = server.packs.watched_names()
        routed = {route.partition("@")[0] for route in server.packs.routes()}
        assert 0 < len(watched & set(versions)) <= 20 + 75  # resident ones and request routes, not the store
        assert watched <= set(versions) | routed
        # an admin route to one of them follows its store alias, found among 10,000 names by the poll
        target = sorted(versions)[1234]
        store.set_alias(target, "prod", versions[target])
        c.load_pack(f"{target}@prod", activate=True)
        assert server.packs.routes()[f"{target}@prod"].version == versions[target]
        newer = store.publish(
            pack_from_edits(target, edits(N + 1, demo_served().backpack.config.n_embd), demo_served(), 1.0, 1.0)
        )
        store.set_alias(target, "prod", newer)
        assert wait_until(lambda: server.packs.routes()[f"{target}@prod"].version == newer, timeout=30)
