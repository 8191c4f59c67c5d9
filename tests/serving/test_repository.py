"""The model repository layout and the metadata a model is served with."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from serving.config import ConfigError, ModelConfig, VersionPolicy
from serving.engine.backends import open_backend
from serving.engine.repository import model_path, resolve_metadata, scan_model, scan_repository, single_model
from serving.errors import ModelLoadError


def test_versions_configs_and_layout_problems(model_repo, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for version in ("1", "10", "2"):
        (repo / "a" / version).mkdir(parents=True)
        shutil.copy(model_repo.onnx, repo / "a" / version / "model.onnx")
    (repo / "a" / "config.yaml").write_text("instances: 2\n")
    (repo / "b" / "1").mkdir(parents=True)
    (repo / "c").mkdir()
    (repo / "c" / "config.yaml").write_text("instances: 0\n")
    (repo / ".incoming" / "1").mkdir(parents=True)  # hidden: an upload not yet renamed into place
    a, b, c = scan_repository(repo, ModelConfig())
    assert (a.name, a.versions, a.wanted(), a.error) == ("a", ["1", "2", "10"], ["10"], "")
    assert all(s.config.instances == 2 for s in a.sources.values())
    assert b.problems["1"].endswith("b/1: expected exactly one of model.onnx, model.mindir, found none")
    assert not b.sources and b.wanted() == ["1"]
    assert "instances must be >= 1, got 0" in c.error and c.config is None
    with pytest.raises(ModelLoadError, match="is not a directory"):
        scan_repository(tmp_path / "nope", ModelConfig())


@pytest.mark.parametrize(
    ("name", "version", "message"),
    [
        ("../etc", "", r"model name '\.\./etc': use letters"),
        ("/etc", "", r"model name '/etc': use letters"),
        ("a/../../etc", "", "use letters"),
        ("..", "", "use letters"),
        ("a", "../../etc", r"version '\.\./\.\./etc': versions are positive integers"),
        ("a", "/1", "versions are positive integers"),
    ],
)
def test_names_and_versions_cannot_leave_the_repository(tmp_path: Path, name, version, message) -> None:
    (tmp_path / "repo" / "a" / "1").mkdir(parents=True)
    assert model_path(tmp_path / "repo", "a", "1") == tmp_path / "repo" / "a" / "1"
    with pytest.raises(ModelLoadError, match=message):
        model_path(tmp_path / "repo", name, version)


def test_symlinks_out_of_the_repository_are_refused(model_repo, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "1").mkdir(parents=True)
    shutil.copy(model_repo.onnx, outside / "1" / "model.onnx")
    repo = tmp_path / "repo"
    (repo / "inner" / "1").mkdir(parents=True)
    (repo / "inner" / "1" / "model.onnx").symlink_to(repo / "inner" / "model.onnx")  # inside: fine
    shutil.copy(model_repo.onnx, repo / "inner" / "model.onnx")
    (repo / "linked").symlink_to(outside)  # a whole model folder elsewhere
    (repo / "file" / "1").mkdir(parents=True)
    (repo / "file" / "1" / "model.onnx").symlink_to(outside / "1" / "model.onnx")  # one file elsewhere
    folders = {f.name: f for f in scan_repository(repo, ModelConfig())}
    assert list(folders["inner"].sources) == ["1"] and not folders["inner"].error
    assert re.search(
        r"repo/linked leads to .*/outside, outside the model repository", folders["linked"].error
    )
    assert not folders["file"].sources
    assert re.search(
        r"file/1/model.onnx leads to .*/outside/1/model.onnx, outside", folders["file"].problems["1"]
    )


@pytest.mark.parametrize(
    ("policy", "wanted"),
    [
        ("latest: 2", ["2", "10"]),
        ("all: true", ["1", "2", "10"]),
        ("specific: [1, 10, 7]", ["1", "10"]),
    ],
)
def test_version_policy_in_config_yaml(model_repo, tmp_path: Path, policy: str, wanted: list[str]) -> None:
    for version in ("1", "10", "2"):
        (tmp_path / "a" / version).mkdir(parents=True)
        shutil.copy(model_repo.onnx, tmp_path / "a" / version / "model.onnx")
    (tmp_path / "a" / "config.yaml").write_text(f"version_policy:\n  {policy}\n")
    assert scan_model(tmp_path, "a", ModelConfig(version_policy=VersionPolicy(all=True))).wanted() == wanted


def test_a_policy_naming_no_present_version_says_so(model_repo, tmp_path: Path) -> None:
    (tmp_path / "a" / "1").mkdir(parents=True)
    shutil.copy(model_repo.onnx, tmp_path / "a" / "1" / "model.onnx")
    folder = scan_model(tmp_path, "a", ModelConfig(version_policy=VersionPolicy(specific=(3,))))
    assert folder.error.endswith("the version policy (specific 3) names none of the versions present (1)")
    with pytest.raises(ConfigError, match="give all or specific, not both"):
        VersionPolicy(all=True, specific=(1,))


def test_single_model_named_after_the_file(model_repo) -> None:
    assert single_model(model_repo.onnx, "", ModelConfig()).name == "hrnet"  # hrnet/1/model.onnx
    assert single_model(model_repo.plain, "custom", ModelConfig()).name == "custom"


def test_foreign_onnx_gets_defaults_and_config_overrides(model_repo) -> None:
    backend = open_backend(model_repo.plain, ModelConfig())
    meta = resolve_metadata(backend, ModelConfig())
    assert (meta.input_size, meta.num_classes, meta.labels) == (16, 5, ())
    assert meta.mean == (0.485, 0.456, 0.406) and meta.label(3) == "3"
    custom = ModelConfig(labels=("a", "b", "c", "d", "e"), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    meta = resolve_metadata(backend, custom)
    assert meta.label(4) == "e" and meta.mean == (0.5, 0.5, 0.5)
    with pytest.raises(ModelLoadError, match="3 labels given for num_classes=5"):
        resolve_metadata(backend, ModelConfig(labels=("a", "b", "c")))
    with pytest.raises(ModelLoadError, match="input height is 16 but the preprocessing input_size is 24"):
        resolve_metadata(backend, ModelConfig(input_size=24))


def test_several_versions_served_newest_by_default(model_repo, start_server, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for version in ("1", "2"):
        (repo / "hrnet" / version).mkdir(parents=True)
        shutil.copy(model_repo.onnx, repo / "hrnet" / version / "model.onnx")
    server = start_server(repo, version_policy=VersionPolicy(all=True))
    batch = np.zeros((1, 3, 32, 32), np.float32)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="hrnet")).versions) == ["1", "2"]
        for asked, served in (("", "2"), ("1", "1"), ("2", "2")):
            request = pb.ModelInferRequest(model_name="hrnet", model_version=asked)
            request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 32, 32])
            request.raw_input_contents.append(batch.tobytes())
            assert stub.ModelInfer(request, timeout=30).model_version == served
        assert {
            s.version
            for s in stub.ModelStatistics(pb.ModelStatisticsRequest(name="hrnet", version="1")).model_stats
        } == {"1"}
