"""PackAdmin over gRPC: packs (list, load, alias, unload), the A/B report and tenants."""

from __future__ import annotations

import logging

import grpc

from edits_store.errors import PackError
from sensepack_proto import admin_pb, admin_pb_grpc
from serve.errors import InvalidRequest, ServeError, from_pack_error
from serve.params import parse_pack_ref
from serve.rpc.common import ServerParts, Tracked, check_decoded, grpc_code
from serve.tenants import TENANT_NAME, Tenant

log = logging.getLogger("sensepack.server")


class AdminServicer(admin_pb_grpc.PackAdminServicer):
    def __init__(self, srv: ServerParts):
        self.srv = srv

    def _resident(self, r) -> admin_pb.ResidentPack:
        m = self.srv.packs
        out = admin_pb.ResidentPack(
            name=r.name,
            version=r.version,
            calibrated_beta=r.calibrated_beta,
            epsilon=r.epsilon,
            state=m.state_of(r),
            routes=m.routes_of(r),
            running_requests=r.refcount,
        )
        if r.gate is not None:
            out.gate_ratio = r.gate.ratio
        return out

    def _gate(self, r) -> admin_pb.GateResult:
        g = r.gate
        if g is None:
            return admin_pb.GateResult(passed=True, skipped=True, beta=r.calibrated_beta, epsilon=r.epsilon)
        return admin_pb.GateResult(passed=g.passed, ratio=g.ratio, epsilon=g.epsilon, beta=g.beta, tokens=g.tokens)

    def _call(self, method, request, context, fn):
        tracked = Tracked(self.srv.metrics, method)
        check_decoded(request, context, tracked)
        try:
            out = fn()
        except ServeError as e:
            code = grpc_code(e)
            tracked.record(code)
            context.abort(code, e.message)
        except Exception as e:
            if isinstance(e, PackError):
                err = from_pack_error(e)
                tracked.record(grpc_code(err))
                context.abort(grpc_code(err), err.message)
            raise
        tracked.record(grpc.StatusCode.OK)
        return out

    def ListPacks(self, request, context):
        def fn():
            m = self.srv.packs
            resp = admin_pb.ListPacksResponse(resident=[self._resident(r) for r in m.residents()], refused=m.refused())
            if request.include_store:
                store = self.srv.store
                for name in store.list_packs():
                    resp.store.add(
                        name=name, versions=[v.version for v in store.list_versions(name)], aliases=store.aliases(name)
                    )
            return resp

        return self._call("ListPacks", request, context, fn)

    def LoadPack(self, request, context):
        def fn():
            parse_pack_ref(request.ref, "ref")
            r, routes = self.srv.packs.activate(request.ref, activate=request.activate)
            return admin_pb.LoadPackResponse(pack=self._resident(r), gate=self._gate(r), routes=routes)

        return self._call("LoadPack", request, context, fn)

    def SetAlias(self, request, context):
        def fn():
            parse_pack_ref(request.name, "name")
            if not request.alias:
                raise InvalidRequest("alias", "empty alias")
            if not request.version:
                raise InvalidRequest("version", "empty version")
            r, routes = self.srv.packs.set_alias(request.name, request.alias, request.version)
            return admin_pb.LoadPackResponse(pack=self._resident(r), gate=self._gate(r), routes=routes)

        return self._call("SetAlias", request, context, fn)

    def UnloadPack(self, request, context):
        def fn():
            name, version, freed = self.srv.packs.unload(request.ref)
            return admin_pb.UnloadPackResponse(name=name, version=version, freed=freed)

        return self._call("UnloadPack", request, context, fn)

    def ABReport(self, request, context):
        def fn():
            s = self.srv
            resp = admin_pb.ABReportResponse(
                traffic_share=s.cfg.ab.traffic_share, sample_rate=s.cfg.ab.sample_rate, confidence=s.cfg.ab.confidence
            )
            stats = s.monitor.report() if s.monitor is not None else {}
            gates = {}
            for r in s.packs.residents():
                if r.gate is not None:
                    gates[(r.name, r.version)] = r.gate.ratio
            for name, version in sorted(set(stats) | set(gates)):
                if request.name and name != request.name:
                    continue
                st = stats.get((name, version))
                if st is None:
                    resp.packs.add(name=name, version=version, gate_ratio=gates[(name, version)])
                    continue
                p = resp.packs.add(
                    name=name,
                    version=version,
                    samples=st.samples,
                    ratio=st.ratio,
                    ci_lower=st.lower,
                    ci_upper=st.upper,
                    epsilon=st.epsilon,
                    breached=st.breached,
                    disabled=st.disabled,
                    tokens=st.tokens,
                )
                if (name, version) in gates:
                    p.gate_ratio = gates[(name, version)]
            return resp

        return self._call("ABReport", request, context, fn)

    def _tenant_info(self, t: Tenant) -> admin_pb.TenantInfo:
        tenants = self.srv.tenants
        out = admin_pb.TenantInfo(
            name=t.name,
            packs=list(t.prefixes),
            max_cold_loads=t.max_cold_loads,
            keys=tenants.keys_of(t.name),
            running=t.running,
            loading=t.loading,
            source=tenants.source.get(t.name, ""),
        )
        if t.max_concurrent_requests is not None:
            out.max_concurrent_requests = t.max_concurrent_requests
        return out

    def ListTenants(self, request, context):
        def fn():
            tenants = self.srv.tenants.tenants
            return admin_pb.ListTenantsResponse(tenants=[self._tenant_info(t) for _, t in sorted(tenants.items())])

        return self._call("ListTenants", request, context, fn)

    def SetTenant(self, request, context):
        def fn():
            if not TENANT_NAME.match(request.name):
                raise InvalidRequest("name", f"{request.name!r}: letters, digits, '.', '_', '-', at most 64")
            limit = request.max_concurrent_requests if request.HasField("max_concurrent_requests") else None
            loads = request.max_cold_loads if request.HasField("max_cold_loads") else 1
            if limit is not None and limit < 1:
                raise InvalidRequest("max_concurrent_requests", f"{limit}: must be >= 1 (unset: no bound)")
            if loads < 1:
                raise InvalidRequest("max_cold_loads", f"{loads}: must be >= 1")
            try:
                t = self.srv.tenants.set(Tenant(request.name, tuple(request.packs), limit, loads), list(request.keys))
            except ValueError as e:
                field, _, msg = str(e).partition(": ")
                raise InvalidRequest(field, msg) from None
            self.srv.metrics.touch_tenants([t.name])
            log.warning("tenant set", extra={"event": "tenant_set", "tenant": t.name, "packs": list(t.prefixes)})
            return self._tenant_info(t)

        return self._call("SetTenant", request, context, fn)

    def RemoveTenant(self, request, context):
        def fn():
            removed = self.srv.tenants.remove(request.name)
            if removed:
                log.warning("tenant removed", extra={"event": "tenant_removed", "tenant": request.name})
            return admin_pb.RemoveTenantResponse(removed=removed)

        return self._call("RemoveTenant", request, context, fn)
