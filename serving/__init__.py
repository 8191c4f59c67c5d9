"""The inference server: backends, dynamic batching, preprocessing, gRPC and REST, health and metrics.

Three packages show the design, depending one way: `serving.api` (gRPC and REST: parse, check,
answer) calls `serving.engine` (the data plane, the batcher, model instances and backends);
`serving.workers` (front-end processes, their records and the owner's side of them) uses both.
Beside them: `server` (puts it together), `config`, `errors`, `metrics`, `telemetry`, `cli`.

Run it in-process with `serving.Server(serving.ServerConfig(...))` (see `serving.server`);
both names are imported on first use, so `import serving.engine.preprocess` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.config import ServerConfig
    from serving.server import Server

__all__ = ["Server", "ServerConfig"]


def __getattr__(name: str) -> Any:
    if name == "Server":
        from serving.server import Server

        return Server
    if name == "ServerConfig":
        from serving.config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
