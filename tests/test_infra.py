"""The Kubernetes overlays render (``kubectl kustomize``, offline) into one deployment per region
whose node workers each have their own identity key and register in their overlay's region."""

from __future__ import annotations

import shutil
import subprocess
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
