"""deploy/: every manifest is valid Kubernetes, and the fields that tie it to the image are right.

Kubernetes objects are validated offline against the published OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail) for the oldest version we claim (1.29) and the
newest it knows. Custom resources have no schema there: KServe's InferenceService is checked
structurally (its predictor's pod fields are validated as a Pod's). No cluster is contacted.

The ties are checked against the code, not against copies of it: HRNET_* names against
serving.config's dataclasses, flags through `hrnet serve`'s own parser into a ServerConfig,
ports against the Dockerfile and the config, the HPA metric against the server's registry, and
the training Job's command line through msrun's and `hrnet train`'s own parsers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from core.settings import flag_values
from serving.cli import add_arguments as add_serve_arguments
from serving.config import ServerConfig, load_server_config
from serving.metrics import ServerMetrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VERSIONS = ("1.29", kubernetes_validate.latest_version())
CUSTOM_RESOURCES = {("serving.api.kserve.io/v1beta1", "InferenceService")}
MODELS_MOUNT = "/models"  # the Dockerfile's VOLUME and HRNET_REPO
KSERVE_MOUNT = "/mnt/models"  # where KServe's storage initializer puts STORAGE_URI


def _documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((str(path.relative_to(REPO)), doc))
    return out


DOCUMENTS = _documents()


def _one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in DOCUMENTS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for where, doc in DOCUMENTS:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec") or spec.get("predictor")
        if pod and "containers" in pod:
            specs.append((f"{where}:{doc['kind']}", pod))
    return specs


def test_no_service_links_reach_our_settings() -> None:
    """Kubernetes gives every pod `<SERVICE>_PORT=tcp://...` for each Service in its namespace: for
    our Service `hrnet` that is HRNET_PORT, which the server would read as its --port."""
    specs = _pod_specs()
    workloads = {
        "deploy/kubernetes/deployment.yaml:Deployment",
        "deploy/training/job.yaml:Job",
        "deploy/kserve/inferenceservice.yaml:InferenceService",
    }
    assert workloads <= {where for where, _ in specs}  # the pods we ship are among those checked
    for where, pod in specs:
        assert pod.get("enableServiceLinks") is False, where


@pytest.mark.parametrize("where,doc", DOCUMENTS, ids=[f"{w}:{d['kind']}" for w, d in DOCUMENTS])
def test_manifest_is_valid(where: str, doc: dict[str, Any]) -> None:
    if (doc["apiVersion"], doc["kind"]) in CUSTOM_RESOURCES:
        pytest.skip("a custom resource: checked structurally by test_inference_service")
    for version in VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def test_every_kind_is_validated_or_named_a_custom_resource() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for _, d in DOCUMENTS}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job"} <= {
        k for _, k in kinds
    }
    for api, kind in kinds - CUSTOM_RESOURCES:
        doc = next(d for _, d in DOCUMENTS if (d["apiVersion"], d["kind"]) == (api, kind))
        kubernetes_validate.validate(doc, VERSIONS[-1])  # a schema exists: no SchemaNotFoundError
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(_one("InferenceService", "hrnet"), VERSIONS[-1])


def _server_config(container: dict[str, Any], setting_env_names: set[str]) -> ServerConfig:
    """What `hrnet serve` makes of this container's env and args (secrets left out)."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    names = {e["name"] for e in container.get("env", []) if e["name"].startswith("HRNET_")}
    assert names <= setting_env_names, f"not settings the server reads: {names - setting_env_names}"
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(container.get("args", []))
    hrnet_env = {k: v for k, v in env.items() if k.startswith("HRNET_")}
    return load_server_config(args.config, hrnet_env, flag_values(args, ServerConfig))


def _grpc_probe_ports(container: dict[str, Any]) -> set[int]:
    probes = [container[p] for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in container]
    assert probes and all("grpc" in p for p in probes), "probes ask the gRPC health service"
    return {p["grpc"]["port"] for p in probes}


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_deployment_matches_the_image_and_the_server(dockerfile: Any, setting_env_names: set[str]) -> None:
    deployment = _one("Deployment", "hrnet")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    config = _server_config(container, setting_env_names)
    gpu = dockerfile["gpu"]
    # The image and its ports, user, volume and device.
    assert container["image"].endswith(":gpu")
    assert _ports(container) == {
        "grpc": config.port,
        "http": config.http_port,
        "metrics": config.metrics_port,
    }
    assert sorted(_ports(container).values()) == sorted(gpu.expose)
    assert _grpc_probe_ports(container) == {config.port}
    assert pod["spec"]["securityContext"]["runAsUser"] == int(gpu.user.split(":")[0])
    assert config.repo == MODELS_MOUNT and gpu.volumes == [MODELS_MOUNT]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == config.repo]
    assert mount["readOnly"]
    assert config.model_defaults.device == "gpu"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Prometheus finds the metrics port.
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.metrics_port
    # The kubelet waits for the preStop pause and the server's whole drain before SIGKILL.
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(pause[1]) + config.grace_period_s
    # The claim it mounts is one of ours.
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {_one("PersistentVolumeClaim", "hrnet-models")["metadata"]["name"]}


def test_services_budget_and_autoscaler_select_the_deployment() -> None:
    deployment = _one("Deployment", "hrnet")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = _ports(deployment["spec"]["template"]["spec"]["containers"][0])
    for name in ("hrnet", "hrnet-replicas"):
        service = _one("Service", name)
        assert service["spec"]["selector"].items() <= labels.items()
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["targetPort"] in ports and grpc["appProtocol"] == "kubernetes.io/h2c"
    assert (
        _one("Service", "hrnet-replicas")["spec"]["clusterIP"] == "None"
    )  # headless: one DNS record per pod
    pdb = _one("PodDisruptionBudget", "hrnet")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    hpa = _one("HorizontalPodAutoscaler", "hrnet")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= deployment["spec"]["replicas"] > pdb["spec"]["maxUnavailable"]


def test_autoscaler_metric_is_one_the_server_exports_and_the_adapter_serves() -> None:
    exported = {family.name for family in ServerMetrics().registry.collect()}
    (metric,) = _one("HorizontalPodAutoscaler", "hrnet")["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name in exported
    adapter = yaml.safe_load(_one("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
    (rule,) = [r for r in adapter["rules"] if r["name"]["as"] == name]
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


# Fields of KServe's ComponentExtensionSpec; the rest of a predictor is a PodSpec.
KSERVE_PREDICTOR_FIELDS = {
    "minReplicas",
    "maxReplicas",
    "scaleTarget",
    "scaleMetric",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "logger",
    "batcher",
    "labels",
    "annotations",
    "deploymentStrategy",
}


def test_inference_service(dockerfile: Any, setting_env_names: set[str]) -> None:
    isvc = _one("InferenceService", "hrnet")
    assert isvc["apiVersion"] == "serving.api.kserve.io/v1beta1"
    assert isvc["metadata"]["annotations"]["serving.api.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = isvc["spec"]["predictor"]
    pod_fields = {"terminationGracePeriodSeconds", "enableServiceLinks"}
    assert set(predictor) - {"containers"} <= KSERVE_PREDICTOR_FIELDS | pod_fields
    assert predictor["minReplicas"] <= predictor["maxReplicas"]
    pod_spec = {k: v for k, v in predictor.items() if k not in KSERVE_PREDICTOR_FIELDS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_spec}
    for version in VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # the name KServe's storage initializer serves
    config = _server_config(container, setting_env_names)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["STORAGE_URI"].startswith("pvc://") and config.repo == KSERVE_MOUNT
    assert _ports(container) == {"h2c": config.port}  # h2c: KServe's name for a gRPC port
    assert config.port in dockerfile["gpu"].expose
    assert _grpc_probe_ports(container) == {config.port}
    assert predictor["terminationGracePeriodSeconds"] > config.grace_period_s
    annotations = isvc["metadata"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == config.metrics_port


def test_training_job_command_parses_and_ties_together(monkeypatch: pytest.MonkeyPatch) -> None:
    from mindspore.parallel.cluster.run import get_args

    from training.config import load_config
    from training.train import add_arguments as add_train_arguments
    from training.train import overrides_from_args

    job = _one("Job", "hrnet-train")
    service = _one("Service", "hrnet-train")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    rank_field = env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert rank_field == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert job["spec"]["completionMode"] == "Indexed"
    nodes = job["spec"]["completions"]
    assert job["spec"]["parallelism"] == nodes  # every rank runs at once
    # msrun's own parser, with the rank the last node would get.
    argv = [a.replace("$(NODE_RANK)", str(nodes - 1)) for a in container["command"] + container["args"]]
    monkeypatch.setattr(sys, "argv", argv)
    msrun = get_args()
    devices = container["resources"]["limits"]["huawei.com/Ascend910"]
    assert msrun.local_worker_num == devices and msrun.worker_num == nodes * devices
    assert msrun.node_rank == nodes - 1
    assert msrun.master_addr == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert msrun.master_port == service["spec"]["ports"][0]["port"]
    # The task is the image's `hrnet` with `train` and flags `hrnet train` accepts.
    assert msrun.task_script == "/opt/hrnet/bin/hrnet" and msrun.task_script_args[0] == "train"
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(msrun.task_script_args[1:])
    config = load_config(args.config, overrides_from_args(args))
    assert config.device_target == "Ascend" and config.arch == "w48" and config.batch_size == 16
    assert args.resume
    # Data and output live on the shared claim every node mounts.
    (data,) = [m for m in container["volumeMounts"] if m["name"] == "data"]
    assert all(p.startswith(data["mountPath"] + "/") for p in (config.data_path, config.output_dir))
    claim = next(v for v in pod["volumes"] if v["name"] == "data")["persistentVolumeClaim"]["claimName"]
    assert "ReadWriteMany" in _one("PersistentVolumeClaim", claim)["spec"]["accessModes"]
