"""Server configuration: one validated pydantic model, every field defaulted.

`load_config(path)` reads YAML; unknown keys are refused and every error names
the dotted key (``limits.max_new_tokens: ...``). With no file the demo profile
is used, so ``sensepack serve`` works offline on tiny random models with the
real tokenizer and a demo pack. ``serve/configs/example.yaml`` documents every
field; ``demo.yaml`` and ``gptj.yaml`` are the two shipped profiles.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sensepack_common.errors import ConfigError, describe_validation_error

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    profile: Literal["demo", "pretrained"] = "demo"
    large_model: str = "EleutherAI/gpt-j-6b"
    backpack: str = "stanfordnlp/backpack-gpt2"
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    demo_seed: int = 0
    torch_threads: int | None = Field(None, ge=1)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9464, ge=-1, le=65535)  # -1: no /metrics endpoint; 0: any free port
    metrics_host: str = "127.0.0.1"
    max_workers: int = Field(64, ge=4, le=4096)
    grace_period_s: float = Field(30.0, ge=0)
    reflection: bool = True
    warmup: bool = True


class TLSConfig(_Section):
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self):
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file must be set together")
        for name in ("cert_file", "key_file", "client_ca_file"):
            p = getattr(self, name)
            if p is not None and not Path(p).is_file():
                raise ValueError(f"tls.{name}: no such file: {p}")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class AdminConfig(_Section):
    token: str | None = None
    token_env: str = "SENSEPACK_ADMIN_TOKEN"

    def resolved_token(self) -> str | None:
        return os.environ.get(self.token_env) or self.token


class HTTPConfig(_Section):
    """The OpenAI-compatible HTTP front-end (serve.http): same process, engine and packs as gRPC."""

    enabled: bool = False  # off unless asked: a second listener is the operator's choice
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port
    served_model_name: str | None = None  # the model id clients send; None: model.large_model
    chat_template: str | None = None  # Jinja chat template (text or a file); None: the tokenizer's own
    max_choices: int = Field(16, ge=1, le=256)  # prompts x n per request
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)  # larger request bodies are refused unread
    # connection hygiene (serve.http.conn): slow or idle clients cannot hold connections
    header_timeout_s: float = Field(10.0, gt=0, le=3600)  # request line + headers, per request
    body_timeout_s: float = Field(30.0, gt=0, le=3600)  # the whole body, once the headers are in (408)
    keep_alive_timeout_s: float = Field(5.0, gt=0, le=3600)  # an idle keep-alive connection is closed
    max_connections: int = Field(1024, ge=1, le=1_000_000)  # open connections; more are closed at once

    @model_validator(mode="after")
    def _template(self):
        t = self.chat_template
        if t is not None and "{" not in t and not Path(t).is_file():  # neither a template nor a file
            raise ValueError(f"http.chat_template: no such file: {t}")
        return self


class TenantConfig(_Section):
    """A tenant: generation keys that name, list and load only packs whose names start with one of `packs`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    keys: list[str] = Field(default_factory=list)
    keys_env: str | None = None  # comma-separated keys, added to keys
    # pack-name prefixes ("team-a-"); never empty (that would open every pack: api.keys do that)
    packs: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    max_concurrent_requests: int | None = Field(None, ge=1)  # running + waiting + scoring at once; None: no bound
    max_cold_loads: int = Field(1, ge=1)  # pack loads its requests trigger at once (packs.load_on_request)

    def resolved_keys(self) -> list[str]:
        env = os.environ.get(self.keys_env, "") if self.keys_env else ""
        return list(self.keys) + [k.strip() for k in env.split(",") if k.strip()]


class APIConfig(_Section):
    """Generation API keys, for both front-ends (gRPC GenerationService and HTTP /v1), separate from the
    admin token. `keys` open every pack; each of `tenants` has its own keys scoped to pack-name prefixes
    (serve.tenants). No key anywhere: generation is open (as vLLM without --api-key)."""

    keys: list[str] = Field(default_factory=list)
    keys_env: str = "SENSEPACK_API_KEYS"  # comma-separated keys, added to api.keys
    tenants: list[TenantConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_tenants(self):
        seen: set[str] = set()
        for i, t in enumerate(self.tenants):
            if t.name in seen:
                raise ValueError(f"tenants[{i}].name: {t.name!r} is used by an earlier tenant")
            seen.add(t.name)
        return self

    def resolved_keys(self) -> list[str]:
        env = [k.strip() for k in os.environ.get(self.keys_env, "").split(",") if k.strip()]
        return list(self.keys) + env


class LimitsConfig(_Section):
    max_prompt_tokens: int = Field(1536, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    default_max_new_tokens: int = Field(32, ge=1)
    max_running: int = Field(32, ge=1, le=4096)
    max_waiting: int = Field(128, ge=0)
    max_top_n_tokens: int = Field(20, ge=0, le=100)
    max_stop_sequences: int = Field(8, ge=0)
    max_stop_sequence_chars: int = Field(256, ge=1)
    max_packs_per_request: int = Field(4, ge=1)
    max_continuations: int = Field(64, ge=1)
    max_temperature: float = Field(100.0, gt=0)
    max_batched_tokens: int | None = Field(None, ge=1)  # None: requests are admitted by count only
    # chunked prefill: prompt tokens an engine step feeds the large model besides one token per decoding row
    # (new prompts and Score forwards go in by chunks, so running streams get a token every step); null: off
    prefill_chunk_tokens: int | None = Field(256, ge=1)  # bench/bench_prefill_stall.py: 128 cost 37% throughput
    max_logit_bias: int = Field(300, ge=0)
    max_stop_token_ids: int = Field(64, ge=0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("limits.default_max_new_tokens must not exceed limits.max_new_tokens")
        return self


class StoreConfig(_Section):
    uri: str | None = None  # None: demo profile publishes its pack into a temporary store
    subscribe: bool = True
    poll_interval_s: float = Field(1.0, gt=0)


class PacksConfig(_Section):
    preload: list[str] = Field(default_factory=list)
    load_on_request: bool = False  # requests may load (and gate) packs; off: only admin / store aliases change packs
    request_load_timeout_s: float = Field(30.0, gt=0)  # bound of a request-triggered load (and gate) without a deadline
    max_resident: int = Field(16, ge=1)  # versions in memory (pinned and admin-routed ones may exceed it)
    max_resident_bytes: int = Field(1 << 30, ge=1)  # bytes of their edits, bounded the same way
    max_combined_bytes: int = Field(256 << 20, ge=1)  # β-scaled sums of the pack sets requests name (LRU)
    allow_beta_above_calibrated: bool = False
    max_beta: float | None = Field(None, ge=0)
    # non-empty: serve only packs signed by one of these ed25519 public keys (PEM file or "ed25519:<64 hex>")
    trusted_keys: list[str] = Field(default_factory=list)


class GateConfig(_Section):
    enabled: bool = True
    corpus: Path | None = None  # None: the small built-in corpus (demo only)
    text_field: str = "text"
    max_texts: int = Field(64, ge=1)
    max_tokens_per_text: int = Field(256, ge=2)
    batch_size: int = Field(8, ge=1)
    epsilon: float | None = Field(None, ge=0)


class ABConfig(_Section):
    enabled: bool = True
    traffic_share: float = Field(0.0, ge=0, le=1)
    control_share: float = Field(0.5, ge=0, le=1)
    sample_rate: float = Field(1.0, ge=0, le=1)
    salt: str = "sensepack-ab"
    confidence: float = Field(0.95, gt=0, lt=1)
    min_samples: int = Field(20, ge=2)
    max_pending: int = Field(256, ge=1)
    lane_every_steps: int = Field(8, ge=1)
    auto_disable: bool = False
    epsilon: float | None = Field(None, ge=0)


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_logs: bool = Field(True, alias="json")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class VLLMSection(_Section):
    """engine: vllm (docs/vllm.md). Fields map to vllm.EngineArgs (serve.vllm.engine.engine_args_from_config)."""

    model: str | None = None  # what vLLM loads; None: model.large_model
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1)
    max_num_seqs: int | None = Field(None, ge=1)  # None: limits.max_running
    enforce_eager: bool = False
    seed: int = 0
    multiprocessing: bool = True  # False: vLLM's engine core in the server process (one rank)
    model_runner: Literal["auto", "v1", "v2"] = "auto"
    engine_args: dict | None = None  # any other vllm.EngineArgs fields


class Config(_Section):
    engine: Literal["embedded", "vllm"] = "embedded"
    vllm: VLLMSection = Field(default_factory=VLLMSection)
    model: ModelConfig = Field(default_factory=ModelConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    api: APIConfig = Field(default_factory=APIConfig)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    packs: PacksConfig = Field(default_factory=PacksConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    ab: ABConfig = Field(default_factory=ABConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _cross(self):
        if self.model.profile == "pretrained" and self.store.uri is None:
            raise ValueError("store.uri is required with model.profile: pretrained")
        if (
            self.engine == "vllm"
            and self.model.profile == "demo"
            and (self.vllm.model is None or self.vllm.multiprocessing or self.vllm.tensor_parallel_size > 1)
        ):
            raise ValueError(
                "engine: vllm with model.profile: demo needs vllm.model (a folder vLLM can load), "
                "vllm.multiprocessing: false and vllm.tensor_parallel_size: 1"
            )
        if self.http.enabled and self.http.port and self.http.port in (self.server.port, self.server.metrics_port):
            raise ValueError(f"http.port: {self.http.port} is also server.port or server.metrics_port")
        if any(not k for k in self.api.keys):
            raise ValueError("api.keys: empty key")
        return self


def served_context(config: Config, model_context: int) -> int:
    """The longest prompt + max_new_tokens a request may ask for: the large model's context, and with
    engine: vllm also vLLM's max_model_len (what serve.vllm.engine passes it), so that requests vLLM
    would refuse are refused at validation, naming their field."""
    if config.engine != "vllm":
        return model_context
    extra = config.vllm.engine_args or {}
    mml = (
        extra.get("max_model_len")
        or config.vllm.max_model_len
        or config.limits.max_prompt_tokens + config.limits.max_new_tokens
    )
    return min(model_context, int(mml))


def parse_config(data: dict | None, source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, source)) from None


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Load a YAML config (None: the demo profile), then apply dotted overrides."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path}: top level must be a mapping")
    for key, value in (overrides or {}).items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return parse_config(data, source)
