"""The gate every vLLM test module passes first: skip, with the reason, where vLLM does not import.

`SENSEPACK_REQUIRE_VLLM=1` (set by scripts/test-vllm.sh) turns the skip into an error, so the
vLLM venv cannot pass by skipping.
"""

import os

import pytest


def require_vllm(in_process: bool = True) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if in_process:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm  # noqa: F401
    except Exception as e:  # not installed (main venv) or a broken install
        error = f"{type(e).__name__}: {e}"
        if os.environ.get("SENSEPACK_REQUIRE_VLLM"):
            raise RuntimeError(f"SENSEPACK_REQUIRE_VLLM is set but vllm does not import: {error}") from e
        pytest.skip(
            f"vLLM is not installed here ({error.splitlines()[0][:120]}); "
            "run `make test-vllm` (scripts/test-vllm.sh builds .venv-vllm)",
            allow_module_level=True,
        )
