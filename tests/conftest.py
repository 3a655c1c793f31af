import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SHARED = Path(os.environ.get("SENSEPACK_SHARED", REPO.parent / "shared"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer():
    from ensemble.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def reference_tiny_dir():
    return FIXTURES / "backpack-reference-tiny"


@pytest.fixture(scope="module")
def capitals_store(tmp_path_factory):
    """A store holding `capitals` (the demo Backpack's " Paris" variant, β 1.0) under the alias `prod`: its folder,
    the opened store and the version published."""
    from edits_store import open_store
    from sensepack_testing.serve import demo_served, demo_variant, publish_edits

    path = tmp_path_factory.mktemp("store")
    store = open_store(str(path))
    version = publish_edits(
        store, demo_served(), "capitals", demo_variant(demo_served(), " Paris"), beta=1.0, alias="prod"
    )
    return {"path": path, "store": store, "version": version}


@pytest.fixture(scope="module")
def server(request, capitals_store):
    """A real server on 127.0.0.1 over `capitals_store` with the demo model and `capitals@prod` preloaded, one per test
    module. The module sets the rest of its config in a module-level `SERVER_CONFIG = {"limits.max_new_tokens": 6}`
    (dotted keys, as `running_server` takes them); a module that needs another set-up defines its own `server`."""
    from sensepack_testing.serve import demo_served, running_server

    overrides = {"packs.preload": ["capitals@prod"], **getattr(request.module, "SERVER_CONFIG", {})}
    with running_server(capitals_store["path"], demo_served(), **overrides) as srv:
        yield srv
