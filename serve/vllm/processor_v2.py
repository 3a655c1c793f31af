"""Model Runner V2 shim (``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``).

UNTESTED ON GPU: MRV2 needs Triton (no CPU backend on the dev box). Written against the installed
vLLM 0.32.0 source; its adapter logic (``v2_adapter.V2Adapter``) is unit-tested with stand-ins of
``LogitsProcRequestState`` / ``LogitsContext``, and vLLM's V2 loader accepts the class.
Register with ``logits_processors=[serve.vllm.V2_PROCESSOR_FQCN]`` when ``use_v2_model_runner``
is on (the GPU default in 0.32); the V1 and V2 loaders reject each other's classes.
"""

from __future__ import annotations

import logging

import torch
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor

from . import SUPPORTED_VLLM, check_vllm_version
from .args import validate_sampling_params

_log = logging.getLogger("sensepack.vllm")


class SensepackLogitsProcessorV2(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_sampling_params(sampling_params)

    def __init__(self, vllm_config, req_states) -> None:
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("sensepack MRV2 processor: speculative decoding is not supported (docs/vllm.md)")
        import vllm

        from .core import EnsembleLogitsCore  # heavy imports here: the frontend imports this module
        from .resolver import REGISTRY, resolve_components  # only to validate params
        from .v2_adapter import V2Adapter

        if not check_vllm_version(vllm.__version__):
            _log.warning(
                "sensepack: vLLM %s is outside the supported range %s (docs/vllm.md)", vllm.__version__, SUPPORTED_VLLM
            )
        backpack, source, window_keep, vocab_size = resolve_components(vllm_config, req_states.device)
        core = EnsembleLogitsCore(backpack, source, window_keep=window_keep, vocab_size=vocab_size)
        self.adapter = V2Adapter(core, req_states)
        self.core = self.adapter.core
        self.vllm_config = vllm_config  # serve.vllm.worker tells engines sharing a process apart
        REGISTRY.processors.append(self)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        return self.adapter.add_request(req_idx, sampling_params)

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        return self.adapter.apply(logits, ctx)
