"""deploy/k8s: every manifest valid against the Kubernetes schemas (strict), and wired up.

`kubernetes-validate` carries the OpenAPI schemas of each Kubernetes release, offline. Strict
mode refuses unknown fields, so a misspelt probe or mount fails here, not at `kubectl apply`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from sluice.gateway.auth import load_keys_file
from tests.deploy.files import (
    K8S,
    configmap_entry,
    image_env,
    k8s_documents,
    k8s_object,
    pod_spec,
    sluice_container,
)

# The newest schemas bundled, and the oldest Kubernetes release still commonly run.
VERSIONS = (kubernetes_validate.latest_version(), "1.30.0")


def sluice_yaml() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(configmap_entry("sluice.yaml"))
    return loaded


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("path", "document"),
    k8s_documents(),
    ids=lambda v: v.name if isinstance(v, Path) else v.get("kind") if isinstance(v, dict) else v,
)
def test_manifest_is_valid(path: Path, document: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(document, version, strict=True)


def test_validation_is_strict() -> None:
    broken = copy.deepcopy(k8s_object("Deployment", "sluice"))
    broken["spec"]["template"]["spec"]["containers"][0]["startupProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == on_disk


def test_cpu_overlay_patches_what_exists() -> None:
    overlay = yaml.safe_load((K8S / "cpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == [".."]
    (image,) = overlay["images"]
    assert image["name"] == sluice_container()["image"].split(":")[0]
    assert image["newTag"].endswith("-cpu") and sluice_container()["image"].endswith("-gpu")
    deployment = k8s_object("Deployment", "sluice")
    (patch,) = overlay["patches"]
    for operation in yaml.safe_load(patch["patch"]):
        node: Any = deployment
        for part in operation["path"].strip("/").split("/"):
            node = node[int(part)] if isinstance(node, list) else node[part]
        if operation["op"] == "replace" and operation["path"].endswith("/resources"):
            assert "nvidia.com/gpu" not in yaml.safe_dump(operation["value"])


def test_probes() -> None:
    spec = sluice_container()
    assert spec["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["httpGet"]["port"] == "http"
        assert spec[probe]["timeoutSeconds"] < spec[probe]["periodSeconds"]


def test_gpu_request_covers_tensor_parallelism() -> None:
    resources = sluice_container()["resources"]
    gpus = int(resources["limits"]["nvidia.com/gpu"])
    assert int(resources["requests"]["nvidia.com/gpu"]) == gpus
    assert gpus >= sluice_yaml()["vllm"]["tensor_parallel_size"]


def test_non_root_read_only_with_writable_cache_tmp_and_shm() -> None:
    pod, spec = pod_spec(), sluice_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in spec["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[image_env("gpu")["SLUICE_CACHE_DIR"]]]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_configuration_from_the_configmap_and_keys_from_the_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec, pod = sluice_container(), pod_spec()
    env = {e["name"]: e["value"] for e in spec["env"]}
    config_file = Path(env["SLUICE_CONFIG_FILE"])
    mount = next(m for m in spec["volumeMounts"] if m["mountPath"] == str(config_file.parent))
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = k8s_object("ConfigMap", volume["configMap"]["name"])
    assert config_file.name in configmap["data"]
    keys_file = Path(sluice_yaml()["gateway"]["keys_file"])
    assert keys_file.parent == config_file.parent and keys_file.name in configmap["data"]

    (source,) = spec["envFrom"]
    secret = k8s_object("Secret", source["secretRef"]["name"])
    variables = set(secret["stringData"])
    keys = yaml.safe_load(configmap["data"][keys_file.name])["keys"]
    assert {k["secret_env"] for k in keys} <= variables
    # The keys file is one sluice accepts once the Secret holds the values.
    path = tmp_path / keys_file.name
    path.write_text(configmap["data"][keys_file.name])
    for variable in variables:
        monkeypatch.setenv(variable, "sk-test-" + variable)
    assert {k.name for k in load_keys_file(path).values()} == {k["name"] for k in keys}


def test_service_reaches_the_container_port() -> None:
    service = k8s_object("Service", "sluice")
    (port,) = service["spec"]["ports"]
    named = {p["name"]: p["containerPort"] for p in sluice_container()["ports"]}
    assert port["targetPort"] in named and port["port"] == named[port["targetPort"]]
    labels = k8s_object("Deployment", "sluice")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_redis_is_where_the_configuration_points() -> None:
    url = urlsplit(sluice_yaml()["gateway"]["redis_url"])
    assert sluice_yaml()["gateway"]["store"] == "redis"
    service = k8s_object("Service", "redis")
    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"]
    redis = k8s_object("StatefulSet", "redis")
    (spec,) = redis["spec"]["template"]["spec"]["containers"]
    assert spec["args"][spec["args"].index("--appendonly") + 1] == "yes"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {
        m["name"] for m in spec["volumeMounts"]
    }


def test_hpa_scales_the_deployment_on_queue_depth_before_shedding() -> None:
    hpa = k8s_object("HorizontalPodAutoscaler", "sluice")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "sluice")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "sluice_engine_waiting"
    average = float(metric["pods"]["target"]["averageValue"])
    # Past max_waiting sluice sheds; the HPA must see the queue grow before that.
    assert 0 < average < sluice_yaml()["admission"]["max_waiting"]


def test_pdb_keeps_a_replica_serving() -> None:
    pdb = k8s_object("PodDisruptionBudget", "sluice")
    hpa = k8s_object("HorizontalPodAutoscaler", "sluice")
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    labels = k8s_object("Deployment", "sluice")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_adapter_rule_serves_the_hpa_metric_from_labels_the_scrape_sets() -> None:
    values = yaml.safe_load((K8S / "prometheus" / "adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    hpa_metric = k8s_object("HorizontalPodAutoscaler", "sluice")["spec"]["metrics"][0]
    assert rule["name"]["as"] == hpa_metric["pods"]["metric"]["name"]
    assert rule["seriesQuery"].startswith(hpa_metric["pods"]["metric"]["name"] + "{")
    overrides = rule["resources"]["overrides"]
    assert {v["resource"] for v in overrides.values()} == {"namespace", "pod"}
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]

    scrape = yaml.safe_load((K8S / "prometheus" / "scrape-config.yaml").read_text())
    (job,) = scrape["scrape_configs"]
    produced = {r["target_label"] for r in job["relabel_configs"] if "target_label" in r}
    assert set(overrides) <= produced
    annotations = k8s_object("Deployment", "sluice")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == sluice_container()["ports"][0]["containerPort"]
