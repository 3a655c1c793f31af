"""V1 shim: ``vllm.v1.sample.logits_processor.LogitsProcessor`` over EnsembleLogitsCore.

Register with ``LLM(..., logits_processors=[V1_PROCESSOR_FQCN], logprobs_mode="processed_logprobs")``
(``serve.vllm.V1_PROCESSOR_FQCN``). vLLM builds one instance per worker (every TP rank) as
``ctor(vllm_config, device, is_pin_memory)``; ``validate_params`` runs at admission in the frontend.
Used by the V1 model runner (CPU; GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``). Speculative decoding
is refused by vLLM itself for V1 custom processors.
"""

from __future__ import annotations

import logging

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from . import SUPPORTED_VLLM, check_vllm_version
from .args import parse_extra_args, validate_sampling_params

_log = logging.getLogger("sensepack.vllm")


def _parse(params):
    return parse_extra_args(getattr(params, "extra_args", None))


class SensepackLogitsProcessor(LogitsProcessor):
    """Adds β·E·δ (the Backpack's sense-edit delta) to every row whose request names packs."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_sampling_params(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        import vllm

        from .core import EnsembleLogitsCore  # heavy imports here: the frontend imports this module
        from .resolver import REGISTRY, resolve_components  # only to validate params

        if not check_vllm_version(vllm.__version__):
            _log.warning(
                "sensepack: vLLM %s is outside the supported range %s (docs/vllm.md)", vllm.__version__, SUPPORTED_VLLM
            )
        backpack, source, window_keep, vocab_size = resolve_components(vllm_config, device)
        self.core = EnsembleLogitsCore(backpack, source, window_keep=window_keep, vocab_size=vocab_size)
        self.vllm_config = vllm_config  # serve.vllm.worker tells engines sharing a process apart
        REGISTRY.processors.append(self)

    def is_argmax_invariant(self) -> bool:
        return False  # the delta changes the argmax: it must run for greedy rows too

    def needs_output_token_ids(self) -> bool:
        # vLLM 0.32 keeps output lists for every custom processor (InputBatch flag); later
        # releases may ask processors. The live lists are what `apply` syncs from.
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.core.update(batch_update, _parse)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        self.core.sync()
        return self.core.add_deltas(logits)
