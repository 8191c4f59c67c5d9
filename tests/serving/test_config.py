"""Settings: defaults that work, YAML < environment < flags, per-model config.yaml, precise errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from serving.cli import add_arguments, flags_to_config
from serving.config import ConfigError, ModelConfig, load_model_config, load_server_config


def test_defaults_work_and_allow_64_fp32_images_at_224() -> None:
    config = load_server_config(None, {}, {"model": "m.onnx"})
    assert config.max_message_bytes >= 64 * 3 * 224 * 224 * 4
    assert config.model_defaults.batching.max_batch_size >= 1


def test_precedence_yaml_then_env_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "server.yaml"
    file.write_text("repo: /models\nport: 9000\nmetrics_port: 9100\nmodel_defaults:\n  instances: 2\n")
    env = {"HRNET_PORT": "9001", "HRNET_MODEL_DEFAULTS__BATCHING__MAX_BATCH_SIZE": "32", "OTHER": "x"}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = flags_to_config(
        parser.parse_args(["--port", "9002", "--max-queue-delay-us", "500", "--max-message-mb", "128"])
    )
    config = load_server_config(file, env, flags)
    assert (config.repo, config.metrics_port, config.port) == ("/models", 9100, 9002)
    assert config.model_defaults.instances == 2
    assert config.model_defaults.batching.max_batch_size == 32
    assert config.model_defaults.batching.max_queue_delay_us == 500
    assert config.max_message_bytes == 128 << 20


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HRNET_PORTT": "1"}, "'portt' is not a setting of ServerConfig"),
        ({"HRNET_PORT": "eighty"}, "port: expected int, got 'eighty'"),
        ({"HRNET_MODEL_DEFAULTS__DEVICE": "tpu"}, "device must be cpu, gpu or ascend; got 'tpu'"),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_server_config(None, {"HRNET_MODEL": "m.onnx", **env})


def test_exactly_one_model_source() -> None:
    with pytest.raises(ConfigError, match="exactly one of repo"):
        load_server_config(None, {})


def test_model_config_yaml_overrides_defaults(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text("instances: 3\nbatching:\n  preferred_batch_sizes: [4, 8]\nlabels: [a, b]\n")
    config = load_model_config(ModelConfig(threads_per_instance=1), file)
    assert (config.instances, config.threads_per_instance, config.labels) == (3, 1, ("a", "b"))
    assert config.batching.preferred_batch_sizes == (4, 8) and config.batching.max_batch_size == 16
    file.write_text("batching:\n  max_queue_delay: 5\n")
    with pytest.raises(ConfigError, match=r"config.yaml: batching: unknown key\(s\) max_queue_delay"):
        load_model_config(ModelConfig(), file)
