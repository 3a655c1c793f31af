"""A tiny Python client for the sensepack gRPC API (and the `sensepack client` CLI).

from serve.client import Client
c = Client("127.0.0.1:50051")
r = c.generate("The capital of Mauritius is", packs=["demo-capitals@prod"], max_new_tokens=8)
print(r.text, [(p.name, p.version) for p in r.packs])
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import grpc

from sensepack_proto import admin_pb, admin_pb_grpc, pb, pb_grpc

PackLike = str | tuple[str, float]


def _packs(packs: Iterable[PackLike]) -> list:
    out = []
    for p in packs or ():
        if isinstance(p, tuple):
            out.append(pb.PackSpec(ref=p[0], beta=p[1]))
        else:
            out.append(pb.PackSpec(ref=p))
    return out


def build_generate_request(
    prompt: str | Sequence[int],
    *,
    packs: Iterable[PackLike] = (),
    base_only: bool = False,
    max_new_tokens: int = 0,
    min_new_tokens: int = 0,
    greedy: bool = True,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    tokens: bool = False,
    logprobs: bool = False,
    top_n: int = 0,
    request_id: str = "",
    ab_key: str = "",
) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=request_id, packs=_packs(packs), base_only=base_only, ab_key=ab_key)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(int(t) for t in prompt)
    req.sampling.method = pb.GREEDY if greedy else pb.SAMPLE
    req.sampling.temperature = temperature
    req.sampling.top_k = top_k
    req.sampling.top_p = top_p
    if seed is not None:
        req.sampling.seed = seed
    req.stopping.max_new_tokens = max_new_tokens
    req.stopping.min_new_tokens = min_new_tokens
    req.stopping.stop_sequences.extend(stop)
    req.stopping.ignore_eos = ignore_eos
    req.response.generated_tokens = tokens
    req.response.token_logprobs = logprobs
    req.response.top_n_tokens = top_n
    return req


class Client:
    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        token: str | None = None,
        ca_file: str | None = None,
        timeout: float | None = None,
        api_key: str | None = None,
    ):
        """token: the admin token ($SENSEPACK_ADMIN_TOKEN); api_key: a generation key when the server sets
        api.keys ($SENSEPACK_API_KEY)."""
        if ca_file:
            creds = grpc.ssl_channel_credentials(Path(ca_file).read_bytes())
            self.channel = grpc.secure_channel(target, creds)
        else:
            self.channel = grpc.insecure_channel(target)
        self.gen = pb_grpc.GenerationServiceStub(self.channel)
        self.admin = admin_pb_grpc.PackAdminStub(self.channel)
        self.token = token if token is not None else os.environ.get("SENSEPACK_ADMIN_TOKEN")
        self.timeout = timeout
        self.api_key = api_key if api_key is not None else os.environ.get("SENSEPACK_API_KEY")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _auth(self):
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def _key(self):
        return [("authorization", f"Bearer {self.api_key}")] if self.api_key else None

    # ---- generation
    def generate(self, prompt, **kw) -> pb.GenerateResponse:
        timeout = kw.pop("timeout", self.timeout)
        return self.gen.Generate(build_generate_request(prompt, **kw), timeout=timeout, metadata=self._key())

    def stream(self, prompt, **kw) -> Iterator[pb.GenerateResponse]:
        timeout = kw.pop("timeout", self.timeout)
        return self.gen.GenerateStream(build_generate_request(prompt, **kw), timeout=timeout, metadata=self._key())

    def score(
        self,
        prefix: str | Sequence[int],
        continuations: Sequence[str | Sequence[int]],
        packs: Iterable[PackLike] = (),
        include_base: bool = True,
        timeout: float | None = None,
    ) -> pb.ScoreResponse:
        req = pb.ScoreRequest(packs=_packs(packs), include_base=include_base)
        if isinstance(prefix, str):
            req.prefix_text = prefix
        else:
            req.prefix_token_ids.ids.extend(prefix)
        for c in continuations:
            if isinstance(c, str):
                req.continuations.add(text=c)
            else:
                req.continuations.add(token_ids=pb.TokenIds(ids=list(c)))
        return self.gen.Score(req, timeout=self.timeout if timeout is None else timeout, metadata=self._key())

    def tokenize(self, text: str, return_tokens: bool = True) -> pb.TokenizeResponse:
        return self.gen.Tokenize(
            pb.TokenizeRequest(text=text, return_tokens=return_tokens), timeout=self.timeout, metadata=self._key()
        )

    def model_info(self) -> pb.ModelInfoResponse:
        return self.gen.ModelInfo(pb.ModelInfoRequest(), timeout=self.timeout, metadata=self._key())

    # ---- admin (bearer token)
    def list_packs(self, include_store: bool = True) -> admin_pb.ListPacksResponse:
        return self.admin.ListPacks(
            admin_pb.ListPacksRequest(include_store=include_store), metadata=self._auth(), timeout=self.timeout
        )

    def load_pack(self, ref: str, activate: bool = True) -> admin_pb.LoadPackResponse:
        return self.admin.LoadPack(
            admin_pb.LoadPackRequest(ref=ref, activate=activate), metadata=self._auth(), timeout=self.timeout
        )

    def set_alias(self, name: str, alias: str, version: str) -> admin_pb.LoadPackResponse:
        return self.admin.SetAlias(
            admin_pb.SetAliasRequest(name=name, alias=alias, version=version),
            metadata=self._auth(),
            timeout=self.timeout,
        )

    def unload_pack(self, ref: str) -> admin_pb.UnloadPackResponse:
        return self.admin.UnloadPack(admin_pb.UnloadPackRequest(ref=ref), metadata=self._auth(), timeout=self.timeout)

    def ab_report(self, name: str = "") -> admin_pb.ABReportResponse:
        return self.admin.ABReport(admin_pb.ABReportRequest(name=name), metadata=self._auth(), timeout=self.timeout)

    def list_tenants(self) -> admin_pb.ListTenantsResponse:
        return self.admin.ListTenants(admin_pb.ListTenantsRequest(), metadata=self._auth(), timeout=self.timeout)

    def set_tenant(
        self,
        name: str,
        packs: list[str],
        keys: list[str],
        max_concurrent_requests: int | None = None,
        max_cold_loads: int | None = None,
    ) -> admin_pb.TenantInfo:
        req = admin_pb.SetTenantRequest(name=name, packs=packs, keys=keys)
        if max_concurrent_requests is not None:
            req.max_concurrent_requests = max_concurrent_requests
        if max_cold_loads is not None:
            req.max_cold_loads = max_cold_loads
        return self.admin.SetTenant(req, metadata=self._auth(), timeout=self.timeout)

    def remove_tenant(self, name: str) -> admin_pb.RemoveTenantResponse:
        return self.admin.RemoveTenant(
            admin_pb.RemoveTenantRequest(name=name), metadata=self._auth(), timeout=self.timeout
        )
