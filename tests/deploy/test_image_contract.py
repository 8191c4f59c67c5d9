"""The manifests under deploy/ reference exactly what `make image-test` exercised.

deploy/image_test.py builds the images, serves from the cpu and gpu ones, and checks each built
image's configuration against its IMAGE table (image names, ports, user, model volume, entrypoint,
HEALTHCHECK). Here the same table is read and compared with the Dockerfile and with every
Kubernetes and KServe manifest, so a manifest cannot name a port, user, path or image that the
image test did not run. Nothing is built here (that needs root, podman and the network).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


@pytest.fixture(scope="module")
def image_test() -> Any:
    spec = importlib.util.spec_from_file_location("image_test", DEPLOY / "image_test.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def contract(image_test: Any) -> dict[str, Any]:
    return image_test.IMAGE


def _docs(relative: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / relative).read_text()) if d]


def _one(relative: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(relative) if d["kind"] == kind]
    return doc


def _reference(name: str) -> str:
    """repository:tag as Docker and podman both resolve a local short name (localhost/ dropped)."""
    return name.removeprefix("localhost/")


def _uid_gid(contract: dict[str, Any]) -> tuple[int, int]:
    uid, gid = contract["user"].split(":")
    return int(uid), int(gid)


def test_the_contract_is_the_dockerfiles(contract: dict[str, Any], dockerfile: dict[str, Any]) -> None:
    for target in ("cpu", "gpu"):
        stage = dockerfile[target]
        assert stage.user == contract["user"]
        assert sorted(stage.expose) == sorted(contract["ports"].values())
        assert stage.volumes == [contract["models"]] and stage.env["HRNET_REPO"] == contract["models"]
        assert stage.entrypoint == contract["entrypoint"] and stage.healthcheck == contract["healthcheck"]
        assert stage.env["HRNET_PORT"] == str(contract["ports"]["grpc"])
        assert stage.env["HRNET_HTTP_PORT"] == str(contract["ports"]["http"])
        assert stage.env["HRNET_METRICS_PORT"] == str(contract["ports"]["metrics"])
        assert stage.env["PATH"].startswith(contract["venv"] + "/bin:")
    assert set(contract["names"]) == {"cpu", "gpu", "train"} <= set(dockerfile)
    for target, name in contract["names"].items():
        assert _reference(name) == f"hrnet:{target}"  # what `make image-test` tags and docs/ builds


def test_the_image_test_exercises_every_target_it_builds(image_test: Any) -> None:
    source = (DEPLOY / "image_test.py").read_text()
    assert set(image_test.IMAGE["names"]) == {"cpu", "gpu", "train"}
    for target in ("cpu", "gpu", "train"):
        assert f"def test_{target}(" in source
    assert '"--format", "docker"' in source  # OCI format would drop the HEALTHCHECK it checks
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^image-test:.*\n\t.*deploy/image_test\.py", makefile, re.M)


def test_deployment_is_what_the_image_test_ran(contract: dict[str, Any]) -> None:
    deployment = _one("kubernetes/deployment.yaml", "Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == _reference(contract["names"]["gpu"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == contract["ports"]
    security = pod["spec"]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == _uid_gid(contract) and security["runAsNonRoot"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == contract["ports"]["grpc"]  # what `hrnet health` asks
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(contract["ports"]["metrics"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HRNET_REPO"] == contract["models"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "models"]
    assert mount["mountPath"] == contract["models"] and mount["readOnly"]  # the image test: not writable


def test_services_are_the_image_ports(contract: dict[str, Any]) -> None:
    for service in _docs("kubernetes/services.yaml"):
        for port in service["spec"]["ports"]:
            assert port["port"] == contract["ports"][port["targetPort"]], service["metadata"]["name"]


def test_inference_service_is_what_the_image_test_ran(contract: dict[str, Any]) -> None:
    isvc = _one("kserve/inferenceservice.yaml", "InferenceService")
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["image"] == _reference(contract["names"]["gpu"])
    assert [p["containerPort"] for p in container["ports"]] == [contract["ports"]["grpc"]]
    assert container["readinessProbe"]["grpc"]["port"] == contract["ports"]["grpc"]
    assert container["livenessProbe"]["grpc"]["port"] == contract["ports"]["grpc"]
    security = container["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == _uid_gid(contract) and security["runAsNonRoot"]
    annotations = isvc["metadata"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(contract["ports"]["metrics"])
    # KServe's storage initializer fills /mnt/models: HRNET_REPO moves there, as the image test
    # moved it to its own mount (the image's /models volume stays unused).
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HRNET_REPO"] == "/mnt/models" != contract["models"]


def test_training_job_runs_the_train_image_as_its_user(contract: dict[str, Any]) -> None:
    job = _one("training/job.yaml", "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The Job runs an Ascend build of the train target (TRAIN_IMAGE=<CANN>): same target, own tag.
    assert container["image"].startswith(_reference(contract["names"]["train"]))
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == _uid_gid(contract)
    assert container["command"][0] == "msrun" or container["command"][0].startswith(contract["venv"])
