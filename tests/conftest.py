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
