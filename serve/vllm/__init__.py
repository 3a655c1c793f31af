"""sensepack on vLLM: the ensemble core as a vLLM custom logits processor (docs/vllm.md).

Modules (import-light on purpose: vLLM imports processor classes in its frontend
process too, to validate per-request arguments):

* ``args``       - the ``SamplingParams.extra_args["sensepack"]`` schema: build / validate / parse.
* ``resolver``   - where the processor gets the Backpack and pack edits: an in-process registry the
                   server fills from its pack manager, or the Backpack folder + edits store URL.
* ``core``       - ``EnsembleLogitsCore``: row -> request bookkeeping over ``ensemble.delta.DeltaTracker``
                   and the batched in-place ``logits += β·E·δ``; shared by both shims.
* ``processor``    - the V1 shim (``vllm.v1.sample.logits_processor.LogitsProcessor``).
* ``processor_v2`` - the Model Runner V2 shim (``vllm.v1.worker.gpu.sample.logits_processor``); untested on GPU.
* ``worker``     - ``SensepackWorkerExtension``: the processors' counters and finished ids through vLLM's
                   ``collective_rpc`` (works whether the workers share the server's process or not).
* ``engine``     - ``VLLMEngine``: the serve engine (scheduler, detokeniser, events) with a ``VLLMRunner``
                   over ``vllm.LLMEngine``.

Only ``processor``, ``processor_v2`` and ``engine`` import vllm.
"""

SUPPORTED_VLLM = ">=0.32.0,<0.33"  # the processor interfaces change between releases (docs/vllm.md)

V1_PROCESSOR_FQCN = "serve.vllm.processor:SensepackLogitsProcessor"
V2_PROCESSOR_FQCN = "serve.vllm.processor_v2:SensepackLogitsProcessorV2"
WORKER_EXTENSION_FQCN = "serve.vllm.worker.SensepackWorkerExtension"  # vLLM resolves it by dotted name


def check_vllm_version(version: str) -> bool:
    """True when `version` lies in SUPPORTED_VLLM (the shims were written and tested against it)."""
    parts = []
    for p in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return (0, 32, 0) <= tuple(parts) < (0, 33, 0)
