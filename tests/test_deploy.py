"""Validation of deploy/: every YAML/JSON file parses, the compose file, Prometheus rules,
Grafana dashboard and Kubernetes manifests are well formed and consistent with each other,
and every metric they use is one that serve/metrics.py exports.

promtool and kubectl checks run only where those tools are on PATH (skipped otherwise).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sensepack_testing import free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sensepack.json"
DS_PROVISIONING = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASH_PROVISIONING = DEPLOY / "grafana" / "provisioning" / "dashboards" / "sensepack.yml"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
GRPC_PORT = 8033
METRICS_PORT = 9464
HTTP_PORT = 8000
ENTRYPOINT = ["sensepack", "serve", "--config", "/etc/sensepack/config.yaml"]

# The metric contract (DESIGN §4, serve/metrics.py). Counters carry _total.
METRICS = {
    "sensepack_requests_total",
    "sensepack_time_to_first_token_seconds",
    "sensepack_inter_token_latency_seconds",
    "sensepack_e2e_request_latency_seconds",
    "sensepack_queue_time_seconds",
    "sensepack_requests_running",
    "sensepack_requests_waiting",
    "sensepack_prompt_tokens_total",
    "sensepack_generation_tokens_total",
    "sensepack_backpack_step_seconds",
    "sensepack_exact_skip_steps_total",
    "sensepack_backpack_window_reprefills_total",
    "sensepack_backpack_resumes_total",
    "sensepack_pack_loads_total",
    "sensepack_active_pack_info",
    "sensepack_requests_by_pack_total",
    "sensepack_ab_ball_ratio",
    "sensepack_ab_ball_ratio_ci_upper",
    "sensepack_ab_ball_ratio_ci_lower",
    "sensepack_ab_samples_total",
    "sensepack_ab_breaches_total",
    "sensepack_pack_auto_disables_total",
    "sensepack_gate_ball_ratio",
    "sensepack_gate_runs_total",
    "sensepack_http_connections_cut_total",
    "sensepack_packs_resident",
    "sensepack_packs_resident_bytes",
    "sensepack_pack_evictions_total",
    "sensepack_pack_load_seconds",
    "sensepack_tenant_requests_total",
    "sensepack_tenant_requests_running",
    "sensepack_tenant_limited_total",
}
HISTOGRAMS = {
    "sensepack_time_to_first_token_seconds",
    "sensepack_inter_token_latency_seconds",
    "sensepack_e2e_request_latency_seconds",
    "sensepack_queue_time_seconds",
    "sensepack_backpack_step_seconds",
    "sensepack_pack_load_seconds",
}
METRIC_RE = re.compile(r"sensepack_[a-zA-Z0-9_]+")
RECORD_RE = re.compile(r"sensepack:[a-zA-Z0-9_:]+")
SEVERITIES = {"critical", "warning", "info"}


def _files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in suffixes)


def _docs(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _load(path: Path):
    docs = _docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    return docs[0]


def _k8s_docs() -> list[tuple[Path, dict]]:
    out = []
    for p in sorted(K8S.glob("*.yaml")):
        if p.name == "kustomization.yaml":
            continue
        out += [(p, d) for d in _docs(p)]
    return out


def _k8s(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in _k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def _metric_base(name: str) -> str:
    """A sample name used in PromQL -> its metric family name in METRICS (or the name unchanged)."""
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if suffix == "_created" and base + "_total" in METRICS:
                return base + "_total"
            if suffix != "_created" and base not in HISTOGRAMS:
                continue  # _sum/_count/_bucket only exist on histograms
            return base
    return name


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _dashboard_exprs(dash: dict) -> list[str]:
    exprs = []
    for p in dash["panels"]:
        exprs += [t["expr"] for t in p.get("targets", []) if "expr" in t]
    exprs += [a["expr"] for a in dash.get("annotations", {}).get("list", []) if "expr" in a]
    for v in dash.get("templating", {}).get("list", []):
        qy = v.get("query")
        if isinstance(qy, dict):
            exprs.append(qy.get("query", ""))
        elif v.get("type") == "query" and isinstance(qy, str):
            exprs.append(qy)
    return exprs


def _rules() -> list[dict]:
    return [r for g in _load(RULES)["groups"] for r in g["rules"]]


# ------------------------------------------------------------------ every file parses


def test_deploy_folder_has_the_expected_files():
    for rel in (
        "docker/Dockerfile.gpu",
        "docker/Dockerfile.cpu",
        "docker/.dockerignore",
        "docker/healthcheck.py",
        "compose/docker-compose.yml",
        "prometheus/prometheus.yml",
        "prometheus/rules.yml",
        "grafana/dashboards/sensepack.json",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/sensepack.yml",
        "k8s/kustomization.yaml",
        "k8s/deployment.yaml",
        "k8s/service.yaml",
        "k8s/configmap.yaml",
        "k8s/secret.example.yaml",
        "k8s/pvc.yaml",
        "config/gpu.yaml",
        "config/cpu.yaml",
        "README.md",
    ):
        assert (DEPLOY / rel).is_file(), f"deploy/{rel} is missing"


@pytest.mark.parametrize("path", _files(".yml", ".yaml"), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    docs = _docs(path)
    assert docs, f"{path}: no YAML document"
    for d in docs:
        assert isinstance(d, dict), f"{path}: every document must be a mapping"


@pytest.mark.parametrize("path", _files(".json"), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_json_parses(path):
    assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict)


# ------------------------------------------------------------------ metric names


def test_metric_contract_matches_serve_metrics():
    """The names deploy/ may use are exactly those serve/metrics.py registers."""
    metrics_mod = pytest.importorskip("serve.metrics")
    registry = metrics_mod.Metrics().registry
    exported = set()
    for family in registry.collect():
        exported.add(family.name + "_total" if family.type == "counter" else family.name)
    assert exported >= METRICS, f"not exported by serve/metrics.py: {sorted(METRICS - exported)}"
    extra = {n for n in exported if n.startswith("sensepack_")} - METRICS
    assert not extra, f"serve/metrics.py exports names this test does not know: {sorted(extra)}"


@pytest.mark.parametrize("path", [RULES, RULES_TEST, DASHBOARD], ids=lambda p: p.name)
def test_only_known_metric_names(path):
    text = path.read_text(encoding="utf-8")
    used = {_metric_base(m) for m in METRIC_RE.findall(text)}
    assert used, f"{path}: no sensepack_ metric used"
    unknown = sorted(used - METRICS)
    assert not unknown, f"{path}: unknown metric names {unknown}"


def test_histogram_suffixes_only_on_histograms():
    for path in (RULES, DASHBOARD):
        for m in METRIC_RE.findall(path.read_text(encoding="utf-8")):
            if m.endswith(("_bucket", "_sum", "_count")):
                assert _metric_base(m) in HISTOGRAMS, f"{path.name}: {m} is not a histogram series"


def test_recording_rules_used_are_defined():
    defined = {r["record"] for r in _rules() if "record" in r}
    for path in (RULES, DASHBOARD):
        used = set(RECORD_RE.findall(path.read_text(encoding="utf-8")))
        assert used <= defined, f"{path.name}: undefined recording rules {sorted(used - defined)}"


# ------------------------------------------------------------------ Prometheus


def test_rules_structure():
    doc = _load(RULES)
    assert set(doc) == {"groups"}
    groups = doc["groups"]
    assert isinstance(groups, list) and groups
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)), "group names must be unique"
    alerts, records = [], []
    for g in groups:
        assert set(g) <= {"name", "interval", "rules", "limit", "query_offset"}, g["name"]
        assert isinstance(g["rules"], list) and g["rules"], f"group {g['name']} has no rules"
        for r in g["rules"]:
            assert ("alert" in r) != ("record" in r), f"{r}: exactly one of alert/record"
            assert isinstance(r.get("expr"), str) and r["expr"].strip(), f"{r}: expr"
            if "record" in r:
                assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", r["record"]) and ":" in r["record"], r["record"]
                assert set(r) <= {"record", "expr", "labels"}, r["record"]
                records.append(r["record"])
            else:
                assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", r["alert"]), r["alert"]
                assert set(r) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, r["alert"]
                assert r.get("labels", {}).get("severity") in SEVERITIES, f"{r['alert']}: labels.severity"
                ann = r.get("annotations", {})
                assert ann.get("summary") and ann.get("description"), f"{r['alert']}: summary and description"
                if "for" in r:
                    assert re.fullmatch(r"\d+[smhd]", r["for"]), f"{r['alert']}: for {r['for']!r}"
                alerts.append(r["alert"])
    assert len(alerts) == len(set(alerts)), "alert names must be unique"
    assert len(records) == len(set(records)), "recording rule names must be unique"
    assert len(records) >= 3


def _alert_exprs() -> str:
    return "\n".join(re.sub(r"\s+", " ", r["expr"]) for r in _rules() if "alert" in r)


@pytest.mark.parametrize(
    "needle",
    [
        "increase(sensepack_ab_breaches_total[10m]) > 0",
        "sensepack_ab_ball_ratio_ci_lower",
        "sensepack_pack_auto_disables_total",
        "sensepack:request_errors:ratio_rate5m",
        "histogram_quantile(0.99, sum by (le) (rate(sensepack_e2e_request_latency_seconds_bucket[5m])))",
        "histogram_quantile(0.99, sum by (le) (rate(sensepack_time_to_first_token_seconds_bucket[5m])))",
        "sensepack_requests_waiting",
        "rate(sensepack_pack_evictions_total[10m])",
        "rate(sensepack_tenant_limited_total[5m])",
    ],
)
def test_required_alerts_present(needle):
    exprs = _alert_exprs()
    if needle == "increase(sensepack_ab_breaches_total[10m]) > 0":
        exprs = exprs.replace(
            "sum by (pack) (increase(sensepack_ab_breaches_total[10m]))", "increase(sensepack_ab_breaches_total[10m])"
        )
    assert needle in exprs, f"no alert uses {needle}"
    # the error ratio the alert uses is the non-OK share
    rec = {r["record"]: r["expr"] for r in _rules() if "record" in r}
    assert 'status!="OK"' in rec["sensepack:request_errors:ratio_rate5m"]


def test_queue_alert_threshold_fits_the_config():
    (rule,) = [r for r in _rules() if r.get("alert") == "SensepackQueueSaturated"]
    threshold = float(re.search(r"sensepack_requests_waiting\)\s*>\s*([0-9.]+)", rule["expr"]).group(1))
    max_waiting = _load(DEPLOY / "config" / "gpu.yaml")["limits"]["max_waiting"]
    assert 0.5 * max_waiting <= threshold < max_waiting


def test_compose_stop_grace_covers_the_drain():
    grace = _load(DEPLOY / "config" / "gpu.yaml")["server"]["grace_period_s"]
    stop = _compose()["services"]["sensepack-gpu"]["stop_grace_period"]
    assert stop.endswith("s") and float(stop[:-1]) > grace


def test_prometheus_config_structure():
    cfg = _load(PROM_CONFIG)
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    targets = [t for sc in jobs["sensepack"]["static_configs"] for t in sc["targets"]]
    assert f"sensepack:{METRICS_PORT}" in targets
    assert jobs["sensepack"].get("metrics_path", "/metrics") == "/metrics"
    assert cfg["rule_files"], "rule_files"


# ------------------------------------------------------------------ Grafana


def test_dashboard_schema():
    dash = _dashboard()
    assert dash["title"] and dash["uid"] and len(dash["uid"]) <= 40
    assert isinstance(dash.get("schemaVersion"), int)
    panels = dash["panels"]
    assert isinstance(panels, list) and panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    for p in panels:
        assert p.get("title"), p["id"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "table", "stat", "gauge", "bargauge", "heatmap", "text"}, p["type"]
        ds = p.get("datasource")
        assert isinstance(ds, dict) and ds.get("type") == "prometheus" and ds.get("uid"), p["title"]
        uid = ds["uid"]
        if uid.startswith("$"):
            assert uid.strip("${}") in variables, f"{p['title']}: datasource variable {uid} undefined"
        targets = p.get("targets")
        assert isinstance(targets, list) and targets, f"{p['title']}: targets"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), f"{p['title']}: refIds must be unique"
        for t in targets:
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), f"{p['title']}: target expr"
        if "repeat" in p:
            assert p["repeat"] in variables, f"{p['title']}: repeat variable {p['repeat']}"
    for v in variables.values():
        if v.get("datasource", {}).get("uid", "").startswith("$"):
            assert v["datasource"]["uid"].strip("${}") in variables


def test_dashboard_covers_the_metrics():
    used = set()
    for e in _dashboard_exprs(_dashboard()):
        used |= {_metric_base(m) for m in METRIC_RE.findall(e)}
    required = {
        "sensepack_requests_total",
        "sensepack_time_to_first_token_seconds",
        "sensepack_inter_token_latency_seconds",
        "sensepack_e2e_request_latency_seconds",
        "sensepack_requests_running",
        "sensepack_requests_waiting",
        "sensepack_generation_tokens_total",
        "sensepack_prompt_tokens_total",
        "sensepack_backpack_step_seconds",
        "sensepack_exact_skip_steps_total",
        "sensepack_pack_loads_total",
        "sensepack_active_pack_info",
        "sensepack_ab_ball_ratio",
        "sensepack_ab_ball_ratio_ci_lower",
        "sensepack_ab_ball_ratio_ci_upper",
        "sensepack_ab_breaches_total",
    }
    assert not required - used, f"dashboard lacks {sorted(required - used)}"


def test_dashboard_expressions_are_balanced():
    for e in _dashboard_exprs(_dashboard()) + [r["expr"] for r in _rules()]:
        for o, c in ("()", "[]", "{}"):
            assert e.count(o) == e.count(c), f"unbalanced {o}{c} in {e!r}"


def test_grafana_provisioning_matches_compose_and_dashboard():
    ds = _load(DS_PROVISIONING)
    assert ds["apiVersion"] == 1
    (prom,) = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    assert prom["url"] == "http://prometheus:9090"
    dash = _dashboard()
    var = {v["name"]: v for v in dash["templating"]["list"]}["datasource"]
    assert var["query"] == "prometheus" and var["current"]["value"] == prom["uid"]

    prov = _load(DASH_PROVISIONING)
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    mounts = _compose()["services"]["grafana"]["volumes"]
    targets = {m.split(":")[1]: m.split(":")[0] for m in mounts if m.startswith(".")}
    assert provider["options"]["path"] in targets, "dashboard provider path is not mounted in compose"
    src = (COMPOSE.parent / targets[provider["options"]["path"]]).resolve()
    assert src == DASHBOARD.parent.resolve()


# ------------------------------------------------------------------ compose


def _compose() -> dict:
    return _load(COMPOSE)


def test_compose_references_exist():
    doc = _compose()
    base = COMPOSE.parent
    named = set(doc.get("volumes") or {})
    services = doc["services"]
    for name in ("sensepack-gpu", "sensepack-cpu", "prometheus", "grafana", "minio"):
        assert name in services, name
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            ctx = (base / svc["build"]["context"]).resolve()
            assert ctx == ROOT, f"{name}: the build context must be the repo root"
            assert (ctx / svc["build"]["dockerfile"]).is_file(), f"{name}: {svc['build']['dockerfile']}"
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith((".", "/")):
                assert (base / src).exists(), f"{name}: bind mount source {src} does not exist"
            else:
                assert src in named, f"{name}: volume {src} is not declared"
        for env_file in [svc["env_file"]] if isinstance(svc.get("env_file"), str) else svc.get("env_file", []):
            assert (base / env_file).exists(), env_file
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else list(deps):
            assert dep in services, f"{name}: depends_on {dep}"


def test_compose_server_services():
    services = _compose()["services"]
    gpu, cpu = services["sensepack-gpu"], services["sensepack-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    for svc, cfg in ((gpu, "gpu.yaml"), (cpu, "cpu.yaml")):
        assert f"../config/{cfg}:/etc/sensepack/config.yaml:ro" in svc["volumes"]
        assert {p.split(":")[-1] for p in svc["ports"]} == {str(GRPC_PORT), str(HTTP_PORT), str(METRICS_PORT)}
        assert "sensepack" in svc["networks"]["default"]["aliases"]
        assert any(str(e).startswith("SENSEPACK_ADMIN_TOKEN=") for e in svc["environment"])
    prom = services["prometheus"]
    rule_mount = [v for v in prom["volumes"] if v.startswith("../prometheus/rules.yml:")]
    assert rule_mount, "rules.yml is not mounted into Prometheus"
    target = rule_mount[0].split(":")[1]
    globs = _load(PROM_CONFIG)["rule_files"]
    assert any(Path(target).match(g) for g in globs), f"{target} does not match rule_files {globs}"


# ------------------------------------------------------------------ Kubernetes


def test_k8s_manifests_basics():
    docs = _k8s_docs()
    assert docs
    for path, d in docs:
        assert d.get("apiVersion") and d.get("kind"), path
        assert d.get("metadata", {}).get("name"), path
    kust = _load(K8S / "kustomization.yaml")
    assert kust["kind"] == "Kustomization"
    for res in kust["resources"]:
        assert (K8S / res).is_file(), f"kustomization resource {res} missing"
    assert "secret.example.yaml" not in kust["resources"], "the example secret must not be deployed"
    kinds = {_d["kind"] for p, _d in docs if p.name in kust["resources"]}
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"} <= kinds


def test_k8s_deployment_probes_and_service():
    dep = _k8s("Deployment", "sensepack")
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": GRPC_PORT, "http": HTTP_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == GRPC_PORT, probe
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 600, "startup budget must cover model loading"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(METRICS_PORT)
    grace = _load(DEPLOY / "config" / "gpu.yaml")["server"]["grace_period_s"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace, "the pod must outlive the server's drain"

    svc = _k8s("Service", "sensepack")
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    svc_ports = {}
    for p in svc["spec"]["ports"]:
        tp = p.get("targetPort", p["port"])
        svc_ports[p["name"]] = ports[tp] if isinstance(tp, str) else tp
    assert svc_ports["grpc"] == GRPC_PORT == c["startupProbe"]["grpc"]["port"]
    assert svc_ports["metrics"] == METRICS_PORT and svc_ports["http"] == HTTP_PORT

    # volumes and secrets the pod references exist
    claims = {d["metadata"]["name"] for _, d in _k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    maps = {d["metadata"]["name"] for _, d in _k8s_docs() if d["kind"] == "ConfigMap"}
    for v in pod["spec"]["volumes"]:
        if "persistentVolumeClaim" in v:
            assert v["persistentVolumeClaim"]["claimName"] in claims
        if "configMap" in v:
            assert v["configMap"]["name"] in maps
    mounts = {m["name"] for m in c["volumeMounts"]}
    assert mounts == {v["name"] for v in pod["spec"]["volumes"]}
    secrets = {d["metadata"]["name"]: d for _, d in _k8s_docs() if d["kind"] == "Secret"}
    token = next(e for e in c["env"] if e["name"] == "SENSEPACK_ADMIN_TOKEN")
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref["key"] in secrets[ref["name"]]["stringData"]
    assert "REPLACE_ME" in secrets[ref["name"]]["stringData"][ref["key"]], "the example secret must be a placeholder"


def test_k8s_configmap_equals_gpu_config():
    cm = _k8s("ConfigMap", "sensepack-config")
    assert yaml.safe_load(cm["data"]["config.yaml"]) == _load(DEPLOY / "config" / "gpu.yaml")


# ------------------------------------------------------------------ server configs


@pytest.mark.parametrize("name", ["gpu.yaml", "cpu.yaml", "k8s-configmap"])
def test_server_configs_validate(name):
    config = pytest.importorskip("serve.config")
    if name == "k8s-configmap":
        data = yaml.safe_load(_k8s("ConfigMap", "sensepack-config")["data"]["config.yaml"])
    else:
        data = _load(DEPLOY / "config" / name)
    cfg = config.parse_config(data, name)
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == GRPC_PORT
    assert cfg.server.metrics_host == "0.0.0.0" and cfg.server.metrics_port == METRICS_PORT
    assert cfg.admin.token is None and cfg.admin.token_env == "SENSEPACK_ADMIN_TOKEN", "no token in a config file"
    assert cfg.store.uri == "/packs"
    assert cfg.http.enabled and cfg.http.host == "0.0.0.0" and cfg.http.port == HTTP_PORT
    if name != "cpu.yaml":
        assert cfg.model.profile == "pretrained" and cfg.model.device.startswith("cuda")
        assert cfg.model.dtype == "bfloat16"
        assert cfg.model.large_model == "EleutherAI/gpt-j-6b" and cfg.model.backpack == "stanfordnlp/backpack-gpt2"
    else:
        assert cfg.model.profile == "demo"


def test_gpu_config_follows_the_shipped_profile():
    shipped = ROOT / "serve" / "configs" / "gptj.yaml"
    if not shipped.is_file():
        pytest.skip("serve/configs/gptj.yaml not present")
    ours = _load(DEPLOY / "config" / "gpu.yaml")["model"]
    theirs = (_load(shipped) or {}).get("model", {})
    for key in ("profile", "large_model", "backpack", "dtype", "device", "tokenizer"):
        if key in theirs:
            assert ours.get(key) == theirs[key], f"model.{key}: deploy/config/gpu.yaml differs from gptj.yaml"


# ------------------------------------------------------------------ Docker


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _ignored(rel: str, patterns: list[str]) -> bool:
    import fnmatch

    hit = False
    for p in patterns:
        neg = p.startswith("!")
        p = p.lstrip("!").rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(x, p) or fnmatch.fnmatch(x, p.replace("**/", "")) for x in prefixes):
            hit = not neg
    return hit


@pytest.mark.parametrize("flavour", ["gpu", "cpu"])
def test_dockerfile(flavour):
    path = DOCKER / f"Dockerfile.{flavour}"
    ins = _instructions(path)
    words = [w for w, _ in ins]
    assert "FROM" in words and words.count("ENTRYPOINT") == 1 and "HEALTHCHECK" in words
    expose = {int(x) for w, r in ins if w == "EXPOSE" for x in r.split()}
    assert expose == {GRPC_PORT, HTTP_PORT, METRICS_PORT}
    users = [r for w, r in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must run as non-root"
    # USER comes after the last RUN that installs (the runtime user never needs to write the install)
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    (ep,) = [r for w, r in ins if w == "ENTRYPOINT"]
    assert json.loads(ep) == ENTRYPOINT
    (hc,) = [r for w, r in ins if w == "HEALTHCHECK"]
    assert "sensepack-healthcheck" in hc and "--start-period" in hc
    runs = " ".join(r for w, r in ins if w == "RUN")
    assert "pip install" in runs
    patterns = [
        ln.strip()
        for ln in (DOCKER / f"Dockerfile.{flavour}.dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    # files the build copies or uses exist and are not excluded from the context
    needed = [x for w, r in ins if w == "COPY" and not r.startswith("--") for x in r.split()[:-1] if x != "."]
    needed += re.findall(r"(deploy/[\w./-]+)", runs)
    needed += [
        "pyproject.toml",
        "requirements-serve-lock.txt",
        "proto/sensepack/v1/generation.proto",
        "proto/sensepack/v1/admin.proto",
        "serve/cli.py",
    ]
    for rel in needed:
        assert (ROOT / rel).exists(), f"{path.name}: {rel} does not exist"
        assert not _ignored(rel, patterns), f"{path.name}: {rel} is excluded by the .dockerignore"
    needed += ["sensepack_proto/generation_pb2.py", "sensepack_proto/admin_pb2_grpc.py"]  # committed stubs
    for rel in needed:
        assert not _ignored(rel, patterns), f"{path.name}: {rel} is excluded by the .dockerignore"
    for rel in (".venv/bin/python", "tests/test_deploy.py", ".git/HEAD"):
        assert _ignored(rel, patterns), f"{rel} should be excluded from the build context"


def test_dockerignore_copies_identical():
    main = (DOCKER / ".dockerignore").read_text()
    for flavour in ("gpu", "cpu"):
        assert (DOCKER / f"Dockerfile.{flavour}.dockerignore").read_text() == main


def test_healthcheck_fails_without_a_server():
    r = subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py"), f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"SENSEPACK_HEALTHCHECK_TIMEOUT": "2", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 1, r.stderr
    assert "unhealthy" in r.stderr


def test_healthcheck_and_metrics_against_a_demo_server():
    """The image's HEALTHCHECK script reports SERVING, and /metrics exposes every contract name."""
    testing = pytest.importorskip("sensepack_testing.serve")
    with testing.running_server() as server:
        r = subprocess.run(
            [sys.executable, str(DOCKER / "healthcheck.py"), f"127.0.0.1:{server.port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert "SERVING" in r.stdout
        text = testing.scrape(server)
    exposed = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            exposed.add(name + "_total" if kind == "counter" and not name.endswith("_total") else name)
    assert exposed >= METRICS, f"not on /metrics: {sorted(METRICS - exposed)}"


# ------------------------------------------------------------------ external tools (optional)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not on PATH")
    return path


def test_promtool_check_rules():
    promtool = _tool("promtool")
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rule_unit_tests():
    promtool = _tool("promtool")
    r = subprocess.run(
        [promtool, "test", "rules", str(RULES_TEST)], capture_output=True, text=True, timeout=300, cwd=RULES_TEST.parent
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_config(tmp_path):
    promtool = _tool("promtool")
    # point rule_files at the repo's rules so that promtool checks them through the config as well
    cfg = _load(PROM_CONFIG)
    cfg["rule_files"] = [str(RULES)]
    p = tmp_path / "prometheus.yml"
    p.write_text(yaml.safe_dump(cfg))
    for target in (PROM_CONFIG, p):
        r = subprocess.run([promtool, "check", "config", str(target)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr


def test_kustomize_build():
    kubectl = _tool("kubectl")
    r = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0 and "unknown command" in r.stderr:
        pytest.skip("kubectl has no kustomize")
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"}
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "sensepack"
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image != "sensepack:gpu", "kustomization images: did not rewrite the image"


def test_promtool_parses_dashboard_queries(tmp_path):
    """Every dashboard PromQL query parses (promtool checks them as recording rules)."""
    promtool = _tool("promtool")
    subst = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*", "$pack": "p"}
    rules = []
    for i, e in enumerate(_dashboard_exprs(_dashboard())):
        if e.startswith("label_values("):
            continue
        for k, v in subst.items():
            e = e.replace(k, v)
        assert "$" not in e, f"unsubstituted variable in {e!r}"
        rules.append({"record": f"dashboard:query_{i}:check", "expr": e})
    p = tmp_path / "dashboard_queries.yml"
    p.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([promtool, "check", "rules", str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
