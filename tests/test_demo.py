"""`hrnet demo` end to end: every stage runs through the real `hrnet` commands and a real server.

The bundled digits config trains for minutes; here the same config is cut to a few steps, since
what is under test is the pipeline (and the server's agreement with `hrnet eval`), not accuracy.
`make demo` runs the full config.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hrnet.demo import CONFIG, Demo

pytestmark = pytest.mark.slow  # generates data, trains, exports and serves a model: minutes

REPO = Path(__file__).resolve().parents[1]


def _quick_config(tmp_path: Path) -> Path:
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    config.update(epochs=1, steps_per_epoch=6, progress=False)
    path = tmp_path / "quick_digits.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _demo(work: Path, config: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "hrnet", "demo", "--work-dir", str(work), "--config", str(config)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    print(result.stdout[-1500:])  # the summary, shown by `pytest -rA`
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def test_demo_runs_every_stage_and_stops_the_server(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    config = _quick_config(tmp_path)
    result = _demo(work, config)
    for n, stage in enumerate(
        ("data", "train", "eval", "export", "serve", "classify", "score", "summary"), 1
    ):
        assert f"[{n}/8] {stage}: done in" in result.stdout
    summary = json.loads((work / "summary.json").read_text())
    # Scored on the whole validation split; > 300 keeps the one-image allowance below under 0.4%.
    assert summary["val_images"] == len(list((work / "data" / "val").rglob("*.png"))) > 300
    # The server (ONNX Runtime, server-side preprocessing) agrees with MindSpore's evaluation of the
    # same checkpoint; one image near a decision boundary may flip.
    assert abs(summary["server_top1"] - summary["eval_top1"]) <= 1 / summary["val_images"] + 1e-9
    assert summary["images_per_s"] > 0 and not summary["train_reused"]
    assert Path(summary["onnx"]).is_file() and Path(summary["mindir"]).is_file()
    assert "val top-1 via server" in result.stdout and "images/s" in result.stdout
    # `hrnet classify` printed its tables for the sample images.
    assert result.stdout.count("rank  index  label") == 3
    assert not _port_open(int(summary["server"].rsplit(":", 1)[1])), "the demo left its server running"

    # Stopped while its server runs: the server goes down with it.
    command = [sys.executable, "-m", "hrnet", "demo", "--work-dir", str(work), "--config", str(config)]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as stopped:
        address = ""
        for line in stopped.stdout:
            if "] serve: hrnet serve" in line:
                address = line.rsplit(" on ", 1)[1].strip()
            if "] serve: done" in line:
                stopped.send_signal(signal.SIGTERM)
                break
        assert stopped.wait(60) == 143
    assert address and not _port_open(int(address.rsplit(":", 1)[1])), "the demo left its server running"

    # Unchanged inputs: the next run reuses training, evaluation and exports, and serves again.
    again = _demo(work, config)
    assert again.stdout.count("reusing") == 5  # data, checkpoint, eval, ONNX, MINDIR
    second = json.loads((work / "summary.json").read_text())
    assert second["train_reused"] and second["eval_top1"] == summary["eval_top1"]
    assert second["server_top1"] == summary["server_top1"]


def test_training_cache_key_follows_config_and_data(tmp_path: Path) -> None:
    config = _quick_config(tmp_path)
    demo = Demo(tmp_path / "demo", config, retrain=False)
    demo.write_data()
    first = demo.cache_key()
    assert demo.cache_key() == first  # unchanged inputs: the previous training is reused
    config.write_text(config.read_text() + "\nepochs: 2\n")
    assert demo.cache_key() != first
    changed_data = sorted((demo.data / "val").rglob("*.png"))[0]
    config.write_text(config.read_text().replace("\nepochs: 2\n", ""))
    assert demo.cache_key() == first
    changed_data.write_bytes(changed_data.read_bytes() + b"\0")
    assert demo.cache_key() != first
