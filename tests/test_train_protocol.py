"""train_edits: the paper's protocol (upstream differences, stale steps, multi-seed tables, baselines)."""

import importlib.util

import pytest
import torch


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adam8bit_without_bitsandbytes_names_the_extra():
    from train_edits.finetune import FinetuneParams, _make_optimizer

    with pytest.raises(RuntimeError, match=r"sensepack\[adam8bit\]"):
        _make_optimizer([torch.nn.Parameter(torch.zeros(2))], FinetuneParams(optimizer="adam8bit"))
