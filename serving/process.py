"""`hrnet serve` as a child process: started on 127.0.0.1, waited for until ready, always stopped.

The demo and the benchmarks drive a real server exactly as a user starts one, so they prove the
command and not a private shortcut. Readiness is the gRPC health service answering SERVING (it
does only once every model has loaded). A server that exits early is reported with the reason
it printed, not just its exit code. Another server (the benchmarks' peers) is run the same way
by overriding `command` and `probe`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
POLL_S = 0.25
REASON_CHARS = 2000  # of the log's tail quoted when the server exits early


class ServerExited(RuntimeError):
    """The server exited (or never became ready); the message carries the end of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`hrnet serve ARGS --host HOST --port PORT --http-port PORT`, its output in `log_path` (a
    temporary file if None). Both ports are free ones, so several servers can run side by side.

    The child leads its own process group, so a server that spawns workers of its own is stopped
    whole, and a Ctrl-C in the terminal reaches only us: we stop it, after its grace period.
    """

    name = "hrnet serve"  # in messages

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path | None = None,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = [str(a) for a in args]
        self.host = host
        self.port = free_port(host)
        self.http_port = free_port(host)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._tmp = None if log_path else tempfile.TemporaryDirectory(prefix="hrnet-serve-")
        self.log_path = log_path or Path(self._tmp.name) / "server.log"  # type: ignore[union-attr]
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_address(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "hrnet",
            "serve",
            *self.args,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--http-port",
            str(self.http_port),
        ]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """Launch and wait until the server reports SERVING; its address. ServerExited otherwise."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                self.command, stdout=log_file, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServerExited(f"{self.name} exited with {self.proc.returncode}: {self.reason()}")
                if self.probe(channel):
                    return self.address
                time.sleep(POLL_S)
        reason = self.reason()
        self.stop()
        raise ServerExited(f"{self.name} was not ready within {timeout_s:.0f} s: {reason}")

    def probe(self, channel: grpc.Channel) -> bool:
        """Whether the server is ready: health SERVING for `""`, which needs every model loaded."""
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def reason(self) -> str:
        """The `hrnet serve: error:` line when there is one, else the end of the log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        errors = [line for line in text.splitlines() if line.startswith("hrnet serve: error:")]
        return errors[-1] if errors else text[-REASON_CHARS:].strip() or "(empty log)"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (the server drains), then SIGKILL if it has not exited in time; the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the group we started, workers included
                self.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return None if self.proc is None else self.proc.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def rss_bytes(self) -> int:
        """The server's resident memory (Linux), for the memory checks of tests and benchmarks."""
        if self.proc is None:
            raise ServerExited("the server was never started")
        pages = int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
