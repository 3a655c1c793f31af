"""The sense model of a pairing: a stand-alone Backpack (`BackpackLM`) or an attached sense head
(`SenseHeadLM`, whose α comes from the large model's hidden states). Both answer the Backpack's
interface; `load_sense_model` picks the class from the folder's config.json.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

from .backpack import BackpackLM, resolve_checkpoint_folder
from .sense_head import SenseHeadLM, is_sense_head

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SenseModel = Union[BackpackLM, SenseHeadLM]  # noqa: UP007  (a runtime alias: isinstance checks use it)


def uses_hidden(model: object) -> bool:
    """Whether the sense model's α reads the large model's final hidden states (a sense head)."""
    return isinstance(model, SenseHeadLM)


def sense_model_folder(spec: str | os.PathLike[str]) -> Path:
    """The folder a sense model name, path or hub id resolves to (a registry name is built on first use)."""
    return resolve_checkpoint_folder(str(spec))


def load_sense_model(
    spec: str | os.PathLike[str], large: PreTrainedModel | None = None, dtype: torch.dtype | None = None
) -> SenseModel:
    """Load a Backpack or a sense head. A sense head is attached to `large` when given (it must be the model the
    head was trained on: the fingerprint is checked), else it loads its own context model by name."""
    folder = sense_model_folder(spec)
    if is_sense_head(folder):
        head = SenseHeadLM.from_pretrained(folder, large=large, dtype=dtype)
        head.name_or_path = str(spec)
        return head
    return BackpackLM.from_pretrained(spec, dtype=dtype)
