"""Bearer token, TLS and mutual TLS between the real client and a real server on 127.0.0.1."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import urllib.request
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import ClientError, RetryPolicy, TlsConfig
from hrnet.cli import main

TOKEN = "s3cret-token"
FAIL_FAST = {"retry": RetryPolicy.off(), "timeout_s": 10}


def test_token_is_required_checked_and_accepted(
    connect: Any, start_server: Any, onnx_repo: Any, digit_images: list
) -> None:
    server = start_server(onnx_repo, auth_token=TOKEN)
    for token in (None, "wrong", TOKEN + "x"):
        client = connect(server.address, token=token, **FAIL_FAST)
        with pytest.raises(ClientError) as info:
            client.classify(digit_images[0].png)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in info.value.message
        with pytest.raises(ClientError) as info:
            list(client.classify_stream([i.png for i in digit_images[:4]], max_in_flight=4))
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert client.server_ready() is True  # probes are exempt

    client = connect(server.address, token=TOKEN, **FAIL_FAST)
    assert client.classify(digit_images[0].png).label.startswith("digit-")
    assert [r.ok for r in client.classify_stream([digit_images[0].png, digit_images[1].png])] == [True, True]
    assert client.infer(np.zeros((1, 3, 32, 32), np.float32)).output.shape == (1, 10)
    assert client.health().model_ready


def test_grpc_health_check_needs_no_token(start_server: Any, onnx_repo: Any) -> None:
    server = start_server(onnx_repo, auth_token=TOKEN)
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_classify_command_reports_a_rejected_token(
    start_server: Any, onnx_repo: Any, digit_images: list, capsys: pytest.CaptureFixture, monkeypatch: Any
) -> None:
    server = start_server(onnx_repo, auth_token=TOKEN)
    image = str(digit_images[0].path)
    assert main(["classify", image, "--server", server.address, "--token", "wrong"]) == 2
    assert "rejected the credentials" in capsys.readouterr().err
    monkeypatch.setenv("HRNET_AUTH_TOKEN", TOKEN)  # the server's variable is the client's default
    assert main(["classify", image, "--server", server.address]) == 0
    assert "[hrnet v1," in capsys.readouterr().out


def test_tls(connect: Any, start_server: Any, onnx_repo: Any, certs: Any, digit_images: list) -> None:
    server = start_server(onnx_repo, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key))
    port = server.server.port
    trusted = connect(server.address, tls=TlsConfig(ca=certs.ca), **FAIL_FAST)
    assert trusted.classify(digit_images[0].png).model_name == "hrnet"
    by_name = connect(f"localhost:{port}", tls=TlsConfig(ca=certs.ca.read_bytes()), **FAIL_FAST)
    assert by_name.server_ready()
    for wrong in (
        connect(server.address, **FAIL_FAST),  # plaintext to a TLS port
        connect(server.address, tls=TlsConfig(ca=certs.other_ca), **FAIL_FAST),  # untrusted certificate
        connect(server.address, tls=TlsConfig(ca=certs.ca, server_name="elsewhere"), **FAIL_FAST),
    ):
        with pytest.raises(ClientError) as info:
            wrong.server_ready()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(
    connect: Any,
    start_server: Any,
    onnx_repo: Any,
    certs: Any,
    digit_images: list,
    capsys: pytest.CaptureFixture,
) -> None:
    server = start_server(
        onnx_repo,
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        tls_client_ca=str(certs.ca),
        auth_token=TOKEN,
    )
    mutual = TlsConfig(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    client = connect(server.address, tls=mutual, token=TOKEN, **FAIL_FAST)
    assert client.classify(digit_images[0].png).label.startswith("digit-")
    anonymous = connect(server.address, tls=TlsConfig(ca=certs.ca), token=TOKEN, **FAIL_FAST)
    with pytest.raises(ClientError) as info:
        anonymous.server_ready()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE  # the handshake fails without a client cert
    with pytest.raises(ValueError, match="cert= and key="):
        TlsConfig(ca=certs.ca, cert=certs.client_cert)

    flags = ["--ca", str(certs.ca), "--cert", str(certs.client_cert), "--key", str(certs.client_key)]
    code = main(["classify", str(digit_images[0].path), "--server", server.address, "--token", TOKEN, *flags])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HRNET_TLS_CERT": "server.pem"}, "TLS needs both tls_cert and tls_key"),
        (
            {"HRNET_TLS_CERT": "/missing/server.pem", "HRNET_TLS_KEY": "/missing/server.key"},
            "cannot read a TLS file",
        ),
    ],
)
def test_serve_refuses_incomplete_or_unreadable_tls_settings(onnx_repo: Any, env: dict, message: str) -> None:
    command = [sys.executable, "-m", "hrnet", "serve", "--repo", str(onnx_repo), "--host", "127.0.0.1"]
    command += ["--port", "0", "--http-port", "-1", "--metrics-port", "-1", "--log-format", "text"]
    result = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr


def test_rest_port_uses_the_same_tls_and_mutual_tls(start_server: Any, onnx_repo: Any, certs: Any) -> None:
    server = start_server(
        onnx_repo, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), tls_client_ca=str(certs.ca)
    )
    url = f"https://{server.http_address}/v2/health/ready"
    mutual = ssl.create_default_context(cafile=str(certs.ca))
    mutual.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    with urllib.request.urlopen(url, context=mutual, timeout=10) as reply:
        assert reply.status == 200
    anonymous = ssl.create_default_context(cafile=str(certs.ca))
    untrusting = ssl.create_default_context(cafile=str(certs.other_ca))
    for context in (anonymous, untrusting):  # no client certificate; the server's not trusted
        with pytest.raises(OSError):  # the handshake fails (SSLError, a reset, or URLError around it)
            urllib.request.urlopen(url, context=context, timeout=10).read()
    with pytest.raises(OSError):  # plaintext to the TLS port
        urllib.request.urlopen(f"http://{server.http_address}/v2/health/ready", timeout=10).read()
