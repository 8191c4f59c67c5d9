"""Settings: defaults that work, YAML < environment < flags, per-model config.yaml, precise errors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from core.settings import flag_values
from serving import event_loop
from serving.cli import add_arguments
from serving.config import ConfigError, ModelConfig, ServerConfig, load_model_config, load_server_config


def test_defaults_work_and_allow_64_fp32_images_at_224() -> None:
    config = load_server_config(None, {}, {"model": "m.onnx"})
    assert config.max_message_bytes >= 64 * 3 * 224 * 224 * 4
    assert config.model_defaults.batching.max_batch_size >= 1


def test_precedence_yaml_then_env_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "server.yaml"
    file.write_text("repo: /models\nport: 9000\nmetrics_port: 9100\nmodel_defaults:\n  instances: 2\n")
    env = {"HRNET_PORT": "9001", "HRNET_MAX_BATCH_SIZE": "32", "HRNET_TRAIN_LR": "0.1", "OTHER": "x"}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--port", "9002", "--max-queue-delay-us", "500", "--max-message-mb", "128"])
    flags = flag_values(args, ServerConfig)
    config = load_server_config(file, env, flags)
    assert (config.repo, config.metrics_port, config.port) == ("/models", 9100, 9002)
    assert config.model_defaults.instances == 2
    assert config.model_defaults.batching.max_batch_size == 32
    assert config.model_defaults.batching.max_queue_delay_us == 500
    assert config.max_message_bytes == 128 << 20


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HRNET_PORT": "eighty"}, "port: expected int, got 'eighty'"),
        ({"HRNET_DEVICE": "tpu"}, "device must be cpu, gpu or ascend; got 'tpu'"),
        ({"HRNET_ADAPTIVE_DELAY": "maybe"}, "adaptive_delay: expected bool, got 'maybe'"),
        ({"HRNET_MEAN": "0.5,x,0.5"}, "mean: expected float, got 'x'"),
        ({"HRNET_EVENT_LOOP": "trio"}, "event_loop must be one of auto, uvloop, asyncio, got 'trio'"),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_server_config(None, {"HRNET_MODEL": "m.onnx", **env})


def test_uvloop_asked_for_but_not_installed_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # how Python marks a module absent
    with pytest.raises(
        ConfigError, match=r"event_loop uvloop: uvloop is not installed \(pip install uvloop\)"
    ):
        load_server_config(None, {"HRNET_MODEL": "m.onnx", "HRNET_EVENT_LOOP": "uvloop"})
    config = load_server_config(None, {"HRNET_MODEL": "m.onnx"})
    assert event_loop.resolve(config.event_loop) == "asyncio"  # auto falls back to the standard loop


def test_unknown_variables_are_logged_with_a_suggestion_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    # Orchestrators add their own variables (Kubernetes: HRNET_SERVICE_HOST for a Service named hrnet).
    config = load_server_config(
        None, {"HRNET_MODEL": "m.onnx", "HRNET_MAX_BACH_SIZE": "8", "HRNET_TRAIN_LR": "1"}
    )
    assert config.model_defaults.batching.max_batch_size == 16
    assert (
        "ignoring HRNET_MAX_BACH_SIZE: not a setting of ServerConfig; did you mean HRNET_MAX_BATCH_SIZE?"
        in caplog.text
    )
    assert "HRNET_TRAIN_LR" not in caplog.text  # the trainer's variables are not the server's business


def test_every_setting_has_one_flag_and_one_variable_and_help() -> None:
    from core.settings import leaves

    names = [leaf.name for leaf in leaves(ServerConfig)]
    assert len(names) == len(set(names))
    assert all(leaf.help for leaf in leaves(ServerConfig))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    assert "--auth-token" not in text  # a secret never goes on a command line
    assert "--no-adaptive-delay" in text and "(default: 2000)" in text


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
