"""One conformance suite, run on every backend importable here (MindSpore Lite: skipped with the reason)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from serving.config import ModelConfig
from serving.engine.backends import BACKENDS, MODEL_FILES, open_backend, unavailable_reason
from serving.engine.backends.onnxrt import choose_providers
from serving.errors import ModelLoadError


def _file_for(name: str, repo):
    return repo.onnx if ".onnx" in BACKENDS[name].suffixes else repo.mindir


@pytest.fixture(params=sorted(BACKENDS))
def backend_name(request) -> str:
    reason = unavailable_reason(BACKENDS[request.param])
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(scope="module")
def reference(model_repo):
    session = ort.InferenceSession(str(model_repo.onnx), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    batch = rng.normal(0, 1, (5, 3, 32, 32)).astype(np.float32)
    return batch, session.run(None, {"image": batch})[0]


def test_loads_with_its_specs_and_the_model_card(backend_name, model_repo) -> None:
    backend = open_backend(_file_for(backend_name, model_repo), ModelConfig(backend=backend_name))
    try:
        assert backend.name == backend_name
        assert backend.input.shape == (-1, 3, 32, 32) and backend.input.dtype == np.float32
        assert backend.output.shape == (-1, 10)
        assert backend.metadata is not None and backend.metadata.labels[2] == "digit-2"
    finally:
        backend.close()


def test_infers_any_batch_size_like_the_reference(backend_name, model_repo, reference) -> None:
    batch, expected = reference
    backend = open_backend(_file_for(backend_name, model_repo), ModelConfig(backend=backend_name))
    try:
        np.testing.assert_allclose(backend.infer(batch), expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(backend.infer(batch[:1]), expected[:1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(backend.infer(batch[1:4]), expected[1:4], rtol=1e-4, atol=1e-5)
    finally:
        backend.close()


def test_missing_and_corrupt_files_are_load_errors(backend_name, tmp_path) -> None:
    suffix = BACKENDS[backend_name].suffixes[0]
    config = ModelConfig(backend=backend_name)
    with pytest.raises(ModelLoadError, match="does not exist"):
        open_backend(tmp_path / f"model{suffix}", config)
    corrupt = tmp_path / f"corrupt{suffix}"
    corrupt.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(ModelLoadError, match=re.escape(str(corrupt))):
        open_backend(corrupt, config)


def test_backend_modules_import_their_library_only_when_loading() -> None:
    code = (
        "import sys; from serving.engine.backends import BACKENDS\n"
        "assert len(BACKENDS) == 3\n"
        "print(sorted(m for m in ('mindspore', 'mindspore_lite', 'onnxruntime') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert proc.stdout.strip() == "[]"


def test_auto_backend_and_refusals(model_repo) -> None:
    assert open_backend(model_repo.onnx, ModelConfig()).name == "onnxruntime"
    expected_ms = "mindspore_lite" if unavailable_reason(BACKENDS["mindspore_lite"]) is None else "mindspore"
    assert open_backend(model_repo.mindir, ModelConfig()).name == expected_ms
    with pytest.raises(ModelLoadError, match=r"cannot run \.onnx files"):
        open_backend(model_repo.onnx, ModelConfig(backend="mindspore"))
    with pytest.raises(ModelLoadError, match="unknown backend 'tensorflow'; use auto or one of onnxruntime"):
        open_backend(model_repo.onnx, ModelConfig(backend="tensorflow"))


def test_the_registry_is_the_one_list_of_backends_and_file_types() -> None:
    assert list(BACKENDS) == ["onnxruntime", "mindspore_lite", "mindspore"]  # the order `auto` prefers
    assert MODEL_FILES == ("model.onnx", "model.mindir")


def test_provider_order_and_configured_providers() -> None:
    installed = ["CUDAExecutionProvider", "CPUExecutionProvider", "TensorrtExecutionProvider"]
    assert choose_providers((), "gpu", installed) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert choose_providers((), "gpu", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers((), "cpu", installed) == ["CPUExecutionProvider"]
    with pytest.raises(ModelLoadError, match="TensorrtExecutionProvider"):
        choose_providers(("TensorrtExecutionProvider",), "gpu", ["CPUExecutionProvider"])


def test_threads_per_instance_never_oversubscribe() -> None:
    assert ModelConfig(instances=2).intra_op_threads(cores=8) == 4
    assert ModelConfig(instances=3).intra_op_threads(cores=2) == 1
    assert ModelConfig(instances=2, threads_per_instance=3).intra_op_threads(cores=2) == 3
    # several models and versions share the machine: 4 instances served in all on 8 cores
    assert ModelConfig(instances=1).intra_op_threads(cores=8, instances_served=4) == 2
    assert ModelConfig(instances=2).intra_op_threads(cores=2, instances_served=5) == 1


def test_device_gpu_without_a_usable_gpu_says_so_and_serves_on_the_cpu(model_repo, caplog) -> None:
    """onnxruntime falls back to the CPU without a word of its own that says so."""
    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
        pytest.skip("onnxruntime-gpu is installed here: a GPU may be usable")
    with caplog.at_level("WARNING", logger="serving.engine.backends.onnxrt"):
        backend = open_backend(model_repo.onnx, ModelConfig(device="gpu"))
    try:
        assert backend.providers == ["CPUExecutionProvider"]
        warning = " ".join(r.getMessage() for r in caplog.records)
        assert "device gpu, but no GPU is usable here" in warning and "serves on the CPU" in warning
    finally:
        backend.close()
