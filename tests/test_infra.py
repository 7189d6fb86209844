"""The Kubernetes overlays render (``kubectl kustomize``, offline) into one deployment per region
whose node workers each have their own identity key and register in their overlay's region."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML reads the rendered manifests")

OVERLAYS = Path(__file__).parent.parent / "infra" / "k8s" / "overlays"
REGIONS = sorted(p.name for p in OVERLAYS.iterdir() if p.is_dir())


def _render(region: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders the kustomizations offline)")
    out = subprocess.run(
        [kubectl, "kustomize", str(OVERLAYS / region)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _env(deployment: dict[str, Any]) -> dict[str, Any]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("region", REGIONS)
def test_each_region_is_its_own_deployment_with_keyed_nodes(region: str) -> None:
    docs = _render(region)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    config = next(c for c in by_kind["ConfigMap"] if c["metadata"]["name"].endswith("config"))
    assert config["metadata"]["name"] == f"{region}-xpando-config"
    assert config["data"]["XPANDO_NODE_REGION"] == region

    nodes = [
        d
        for d in by_kind["Deployment"]
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "node-worker"
    ]
    assert nodes, f"{region} has no node workers"
    keys = []
    for node in nodes:
        assert node["metadata"]["name"].startswith(f"{region}-node-")
        assert node["metadata"]["labels"]["xpando.io/region"] == region
        env = _env(node)
        node_id = env["XPANDO_NODE_ID"]["value"]
        assert node_id != "CHANGE_ME"
        # Its region comes from the region's ConfigMap ...
        ref = env["XPANDO_NODE_REGION"]["valueFrom"]["configMapKeyRef"]
        assert ref["name"] == f"{region}-xpando-config"
        # ... and its identity from its own entry of the node-keys Secret.
        secret = env["XPANDO_NODE_KEY"]["valueFrom"]["secretKeyRef"]
        assert secret == {"name": "xpando-node-keys", "key": node_id}
        keys.append(node_id)
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("region", REGIONS)
def test_the_api_is_restarted_on_liveness_and_routed_to_on_readiness(region: str) -> None:
    api = next(
        d
        for d in _render(region)
        if d["kind"] == "Deployment"
        and d["metadata"]["labels"].get("app.kubernetes.io/component") == "api"
    )
    container = api["spec"]["template"]["spec"]["containers"][0]
    # A pod without a live expert behind it gets no traffic, but is not restarted for it.
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


INFRA = Path(__file__).parent.parent / "infra"


def test_each_region_the_design_names_has_its_overlay_and_a_fly_node() -> None:
    assert {"eu-west", "us-east", "ap-southeast"} <= set(REGIONS)
    fly_regions = {
        tomllib.loads(f.read_text())["env"].get("XPANDO_NODE_REGION")
        for f in (INFRA / "fly").glob("fly.node*.toml")
    }
    assert {"eu-west", "ap-southeast"} <= fly_regions


@pytest.mark.parametrize("region", REGIONS)
def test_prometheus_scrapes_every_process_where_it_serves_metrics(region: str) -> None:
    docs = _render(region)
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in deployments} == {
        "api",
        "core-worker",
        "node-worker",
    }
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        template = deployment["spec"]["template"]
        annotations = template["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", name
        assert annotations["prometheus.io/path"] == "/metrics"
        port = int(annotations["prometheus.io/port"])
        container = template["spec"]["containers"][0]
        assert port in [p["containerPort"] for p in container.get("ports", [])], name
        if deployment["metadata"]["labels"]["app.kubernetes.io/component"] == "api":
            assert port == int(config["data"]["XPANDO_API_PORT"])
        else:  # a worker serves its metrics where the ConfigMap tells it to, on every address
            assert port == int(config["data"]["XPANDO_METRICS_PORT"])
            assert config["data"]["XPANDO_METRICS_HOST"] == "0.0.0.0"


def _defined_metric_names() -> set[str]:
    """Every series name xpando's own metrics can produce."""
    from prometheus_client import Counter, Gauge, Histogram

    from xpando import metrics

    names = {"xpando_provider_breaker_state", "xpando_node_breakers"}  # BreakerCollector's
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            names.add(f"{value._name}_total")
        elif isinstance(value, Histogram):
            names |= {f"{value._name}_{suffix}" for suffix in ("bucket", "count", "sum")}
        elif isinstance(value, Gauge):
            names.add(value._name)
    return names


def test_the_dashboard_graphs_only_metrics_xpando_serves() -> None:
    dashboard = json.loads((INFRA / "grafana" / "xpando-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bxpando_[a-z_]+", expr)}
    defined = _defined_metric_names()
    assert used, "the dashboard graphs no xpando metric"
    assert used <= defined, sorted(used - defined)
    # Every metric of the catalogue is on the dashboard (an added metric gets a panel).
    families = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in defined}
    graphed = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used}
    assert families <= graphed, sorted(families - graphed)


def test_compose_prometheus_scrapes_the_api_and_every_worker() -> None:
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    scrape = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    targets = {
        target
        for job in scrape["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    workers = {
        name
        for name, service in compose["services"].items()
        if "worker" in (service.get("command") or [])
    }
    assert workers >= {"core-worker", "node-eu-1", "node-us-1", "node-ap-1"}
    for name in workers:
        port = compose["services"][name]["environment"]["XPANDO_METRICS_PORT"]
        assert f"{name}:{port}" in targets, name
    assert "api:8000" in targets
