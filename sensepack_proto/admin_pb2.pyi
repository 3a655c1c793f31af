from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResidentPack(_message.Message):
    __slots__ = ("name", "version", "calibrated_beta", "epsilon", "state", "routes", "running_requests", "gate_ratio")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_BETA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    GATE_RATIO_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    calibrated_beta: float
    epsilon: float
    state: str
    routes: _containers.RepeatedScalarFieldContainer[str]
    running_requests: int
    gate_ratio: float
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., calibrated_beta: _Optional[float] = ..., epsilon: _Optional[float] = ..., state: _Optional[str] = ..., routes: _Optional[_Iterable[str]] = ..., running_requests: _Optional[int] = ..., gate_ratio: _Optional[float] = ...) -> None: ...

class StorePack(_message.Message):
    __slots__ = ("name", "versions", "aliases")
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    aliases: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ..., aliases: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListPacksRequest(_message.Message):
    __slots__ = ("include_store",)
    INCLUDE_STORE_FIELD_NUMBER: _ClassVar[int]
    include_store: bool
    def __init__(self, include_store: _Optional[bool] = ...) -> None: ...

class ListPacksResponse(_message.Message):
    __slots__ = ("resident", "store", "refused")
    class RefusedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    resident: _containers.RepeatedCompositeFieldContainer[ResidentPack]
    store: _containers.RepeatedCompositeFieldContainer[StorePack]
    refused: _containers.ScalarMap[str, str]
    def __init__(self, resident: _Optional[_Iterable[_Union[ResidentPack, _Mapping]]] = ..., store: _Optional[_Iterable[_Union[StorePack, _Mapping]]] = ..., refused: _Optional[_Mapping[str, str]] = ...) -> None: ...

class LoadPackRequest(_message.Message):
    __slots__ = ("ref", "activate")
    REF_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    ref: str
    activate: bool
    def __init__(self, ref: _Optional[str] = ..., activate: _Optional[bool] = ...) -> None: ...

class GateResult(_message.Message):
    __slots__ = ("passed", "ratio", "epsilon", "beta", "tokens", "skipped")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    ratio: float
    epsilon: float
    beta: float
    tokens: int
    skipped: bool
    def __init__(self, passed: _Optional[bool] = ..., ratio: _Optional[float] = ..., epsilon: _Optional[float] = ..., beta: _Optional[float] = ..., tokens: _Optional[int] = ..., skipped: _Optional[bool] = ...) -> None: ...

class LoadPackResponse(_message.Message):
    __slots__ = ("pack", "gate", "routes")
    PACK_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    pack: ResidentPack
    gate: GateResult
    routes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pack: _Optional[_Union[ResidentPack, _Mapping]] = ..., gate: _Optional[_Union[GateResult, _Mapping]] = ..., routes: _Optional[_Iterable[str]] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("name", "alias", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    version: str
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class UnloadPackRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class UnloadPackResponse(_message.Message):
    __slots__ = ("name", "version", "freed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FREED_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    freed: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., freed: _Optional[bool] = ...) -> None: ...

class ABReportRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class PackABStatus(_message.Message):
    __slots__ = ("name", "version", "samples", "ratio", "ci_lower", "ci_upper", "epsilon", "breached", "disabled", "gate_ratio", "tokens")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    CI_LOWER_FIELD_NUMBER: _ClassVar[int]
    CI_UPPER_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    BREACHED_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    GATE_RATIO_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    samples: int
    ratio: float
    ci_lower: float
    ci_upper: float
    epsilon: float
    breached: bool
    disabled: bool
    gate_ratio: float
    tokens: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., samples: _Optional[int] = ..., ratio: _Optional[float] = ..., ci_lower: _Optional[float] = ..., ci_upper: _Optional[float] = ..., epsilon: _Optional[float] = ..., breached: _Optional[bool] = ..., disabled: _Optional[bool] = ..., gate_ratio: _Optional[float] = ..., tokens: _Optional[int] = ...) -> None: ...

class ABReportResponse(_message.Message):
    __slots__ = ("packs", "traffic_share", "sample_rate", "confidence")
    PACKS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_SHARE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    packs: _containers.RepeatedCompositeFieldContainer[PackABStatus]
    traffic_share: float
    sample_rate: float
    confidence: float
    def __init__(self, packs: _Optional[_Iterable[_Union[PackABStatus, _Mapping]]] = ..., traffic_share: _Optional[float] = ..., sample_rate: _Optional[float] = ..., confidence: _Optional[float] = ...) -> None: ...

class TenantInfo(_message.Message):
    __slots__ = ("name", "packs", "max_concurrent_requests", "max_cold_loads", "keys", "running", "loading", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_COLD_LOADS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    packs: _containers.RepeatedScalarFieldContainer[str]
    max_concurrent_requests: int
    max_cold_loads: int
    keys: int
    running: int
    loading: int
    source: str
    def __init__(self, name: _Optional[str] = ..., packs: _Optional[_Iterable[str]] = ..., max_concurrent_requests: _Optional[int] = ..., max_cold_loads: _Optional[int] = ..., keys: _Optional[int] = ..., running: _Optional[int] = ..., loading: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants",)
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[TenantInfo]
    def __init__(self, tenants: _Optional[_Iterable[_Union[TenantInfo, _Mapping]]] = ...) -> None: ...

class SetTenantRequest(_message.Message):
    __slots__ = ("name", "packs", "keys", "max_concurrent_requests", "max_cold_loads")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_COLD_LOADS_FIELD_NUMBER: _ClassVar[int]
    name: str
    packs: _containers.RepeatedScalarFieldContainer[str]
    keys: _containers.RepeatedScalarFieldContainer[str]
    max_concurrent_requests: int
    max_cold_loads: int
    def __init__(self, name: _Optional[str] = ..., packs: _Optional[_Iterable[str]] = ..., keys: _Optional[_Iterable[str]] = ..., max_concurrent_requests: _Optional[int] = ..., max_cold_loads: _Optional[int] = ...) -> None: ...

class RemoveTenantRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveTenantResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...
