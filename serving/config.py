"""Server and model settings: typed dataclasses whose defaults work out of the box.

Precedence, lowest first: the defaults here, the server YAML file (`--config`), environment
variables `HRNET_<FIELD>` (nested fields joined by `__`, e.g. `HRNET_MODEL_DEFAULTS__INSTANCES=2`),
then command-line flags. Each model's `REPO/<model>/config.yaml` then overrides `model_defaults`
for that model only, because it is the more specific statement. Durations and sizes carry their
unit in the field name.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "HRNET_"
MiB = 1 << 20


class ConfigError(ValueError):
    """A setting is unknown or has a bad value; the message names the key and the source."""


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching. Defaults suit online serving of a small CNN on a few cores."""

    # Largest batch the backend runs; a request with more images is split into chunks.
    max_batch_size: int = 16
    # How long the oldest queued request may wait for others to join it. Bounds the latency
    # batching adds at low load; 0 disables waiting (batches still form while instances are busy).
    max_queue_delay_us: int = 2000
    # End the wait early when, at the recent arrival rate, no other request is due before it
    # ends: at low load a lone request then goes at once instead of paying the delay.
    adaptive_delay: bool = True
    # Batch sizes the backend prefers (e.g. TensorRT profiles); a batch is cut to the largest
    # one that fits and sent as soon as the largest is reached. Empty: any size.
    preferred_batch_sizes: tuple[int, ...] = ()
    # Images that may wait; beyond this a request fails at once with RESOURCE_EXHAUSTED. Small,
    # because for online serving a long queue only turns into timeouts.
    max_queue_size: int = 256
    # Queue timeout applied when a request sets none; 0: only the client's deadline applies.
    default_timeout_us: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"batching.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"batching.max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        bad = [s for s in self.preferred_batch_sizes if not 1 <= s <= self.max_batch_size]
        if bad:
            raise ConfigError(
                f"batching.preferred_batch_sizes {bad} outside 1..max_batch_size {self.max_batch_size}"
            )
        if self.max_queue_size < self.max_batch_size:
            raise ConfigError(
                f"batching.max_queue_size {self.max_queue_size} < max_batch_size {self.max_batch_size}"
            )
        if self.default_timeout_us < 0:
            raise ConfigError(f"batching.default_timeout_us must be >= 0, got {self.default_timeout_us}")


@dataclass(frozen=True)
class ModelConfig:
    """How one model is run: backend, device, instances and preprocessing overrides."""

    # "auto" (onnxruntime for .onnx; MindSpore Lite, else MindSpore, for .mindir), "onnxruntime",
    # "mindspore_lite" or "mindspore".
    backend: str = "auto"
    device: str = "cpu"  # "cpu", "gpu" or "ascend"
    # onnxruntime execution providers in order of preference; empty: TensorRT -> CUDA -> CPU on
    # "gpu" (those installed), CPU on "cpu".
    providers: tuple[str, ...] = ()
    # Copies of the model executing batches concurrently.
    instances: int = 1
    # Intra-op threads per instance; 0: cores // instances, so instances x threads <= cores.
    threads_per_instance: int = 0
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    # Preprocessing overrides for models without our metadata (or to correct it); 0/empty: from
    # the model's metadata, else from its input shape with ImageNet normalization.
    input_size: int = 0
    resize_size: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "onnxruntime", "mindspore_lite", "mindspore"):
            raise ConfigError(
                f"backend must be auto, onnxruntime, mindspore_lite or mindspore; got {self.backend!r}"
            )
        if self.device not in ("cpu", "gpu", "ascend"):
            raise ConfigError(f"device must be cpu, gpu or ascend; got {self.device!r}")
        if self.instances < 1:
            raise ConfigError(f"instances must be >= 1, got {self.instances}")
        if self.threads_per_instance < 0:
            raise ConfigError(f"threads_per_instance must be >= 0, got {self.threads_per_instance}")

    def intra_op_threads(self, cores: int | None = None) -> int:
        """Threads for one instance: never more in total than the machine has cores."""
        if self.threads_per_instance:
            return self.threads_per_instance
        return max(1, (cores or os.cpu_count() or 1) // self.instances)


@dataclass(frozen=True)
class ServerConfig:
    """The server process."""

    host: str = "0.0.0.0"
    port: int = 8001  # gRPC; 0 picks a free port
    metrics_port: int = 8002  # Prometheus over HTTP; 0 picks a free port, -1 disables
    repo: str = ""  # model repository REPO/<model>/<version>/model.onnx|model.mindir
    model: str = ""  # one model file instead of a repository
    model_name: str = ""  # its name; empty: the file's stem (or its folder for model.onnx)
    # gRPC message limit both ways. 64 FP32 images at 224x224 are 38.5 MiB: the 4 MiB gRPC
    # default would reject 7.
    max_message_bytes: int = 64 * MiB
    grace_period_s: float = 30.0  # SIGTERM: how long queued and running work may take to finish
    preprocess_workers: int = 0  # image decode threads; 0: one per core
    # Decoded pixel cap per image: rejects decompression bombs before they are decoded.
    max_image_pixels: int = 40_000_000
    log_format: str = "json"  # "json" lines or "text"
    log_level: str = "info"
    # Calls must carry `authorization: Bearer <auth_token>` (health checks exempt); empty: no check.
    # Prefer the environment (HRNET_AUTH_TOKEN) or the config file to anything visible in `ps`.
    auth_token: str = ""
    tls_cert: str = ""  # PEM certificate chain and private key: serve TLS instead of plaintext
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM CA bundle: require client certificates it signed (mutual TLS)
    model_defaults: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        if bool(self.repo) == bool(self.model):
            raise ConfigError("give exactly one of repo (a model repository) or model (one model file)")
        if not 0 <= self.port <= 65535 or not -1 <= self.metrics_port <= 65535:
            raise ConfigError(f"bad port: port={self.port} metrics_port={self.metrics_port}")
        if self.max_message_bytes < MiB:
            raise ConfigError(f"max_message_bytes must be >= 1 MiB, got {self.max_message_bytes}")
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"log_format must be json or text, got {self.log_format!r}")
        if self.grace_period_s < 0 or self.max_image_pixels < 1 or self.preprocess_workers < 0:
            raise ConfigError("grace_period_s, preprocess_workers must be >= 0 and max_image_pixels >= 1")
        if bool(self.tls_cert) != bool(self.tls_key) or (self.tls_client_ca and not self.tls_cert):
            raise ConfigError(
                "TLS needs both tls_cert and tls_key (and tls_client_ca only together with them)"
            )


def build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from plain data (YAML, env strings), checking every key and type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {name: _coerce(hints[name], value, f"{where}: {name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    origin = typing.get_origin(hint)
    try:
        if origin is tuple:
            (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
            items = value.split(",") if isinstance(value, str) else list(value)
            items = [v.strip() if isinstance(v, str) else v for v in items]
            return tuple(_coerce(item, v, where) for v in items if v != "")
        if origin in (typing.Union, types.UnionType):
            raise ConfigError(f"{where}: unsupported type {hint}")
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}") from None
    raise ConfigError(f"{where}: unsupported type {hint}")


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `top` over `base` (nested mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def env_overrides(env: Mapping[str, str], cls: type = ServerConfig) -> dict[str, Any]:
    """`HRNET_PORT=9000`, `HRNET_MODEL_DEFAULTS__BATCHING__MAX_BATCH_SIZE=32` as nested data."""
    out: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        target_cls, node = cls, out
        for i, part in enumerate(path):
            names = {f.name: f for f in dataclasses.fields(target_cls)}
            if part not in names:
                raise ConfigError(f"{key}: {part!r} is not a setting of {target_cls.__name__}")
            if i == len(path) - 1:
                node[part] = value
            else:
                target_cls = typing.get_type_hints(target_cls)[part]
                if not dataclasses.is_dataclass(target_cls):
                    raise ConfigError(f"environment variable {key}: {part!r} has no sub-settings")
                node = node.setdefault(part, {})
    return out


def load_server_config(
    file: Path | None = None, env: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None
) -> ServerConfig:
    data: dict[str, Any] = read_yaml(file) if file else {}
    data = merge(data, env_overrides(os.environ if env is None else env))
    data = merge(data, flags or {})
    return build(ServerConfig, data, str(file) if file else "server config")


def load_model_config(defaults: ModelConfig, file: Path) -> ModelConfig:
    """`defaults` overridden by the model's own config.yaml when it exists."""
    if not file.exists():
        return defaults
    return build(ModelConfig, merge(dataclasses.asdict(defaults), read_yaml(file)), str(file))
