"""`hrnet classify` against a real server: tables, JSON lines, a corrupt image, a server that is down."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from hrnet.cli import main


def _folder_with_a_corrupt_image(digit_images: list, tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    for image in digit_images[:5]:
        shutil.copy(image.path, folder / image.path.name)
    shutil.copy(digit_images[5].path, folder / "nested" / digit_images[5].path.name)
    (folder / "003_corrupt.png").write_bytes(digit_images[6].png[:40])  # a truncated PNG
    (folder / "notes.txt").write_text("not an image: skipped by suffix")
    (folder / "scan.tif").write_bytes(b"II*\x00")  # a format the server refuses: skipped too
    return folder


def test_json_lines_for_a_folder_with_a_corrupt_image(
    grpc_server: Any, digit_images: list, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = _folder_with_a_corrupt_image(digit_images, tmp_path)
    code = main(["classify", str(folder), "--server", grpc_server.address, "--json", "--top-k", "3"])
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    # 5 + 1 nested + the corrupt one, in path order; notes.txt and scan.tif are skipped
    assert [r["image"] for r in records] == [str(p) for p in sorted(folder.rglob("*.png"))]
    assert len(records) == 7
    bad = [r for r in records if "error" in r]
    assert [Path(r["image"]).name for r in bad] == ["003_corrupt.png"]
    assert bad[0]["error"]["code"] == "INVALID_ARGUMENT" and "PNG" in bad[0]["error"]["message"]
    good = [r for r in records if "error" not in r]
    assert all(len(r["predictions"]) == 3 and r["model"] == "hrnet" for r in good)
    assert all(r["predictions"][0]["label"] == f"digit-{r['predictions'][0]['index']}" for r in good)
    assert code == 1
    assert "1 of 7 images failed" in err
    assert "img" in err  # the progress bar, on stderr


def test_tables_for_named_files(grpc_server: Any, digit_images: list, capsys: pytest.CaptureFixture) -> None:
    paths = [str(i.path) for i in digit_images[:2]]
    code = main(["classify", *paths, "--server", grpc_server.address, "--top-k", "2", "--concurrency", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(paths[0]) and "[hrnet v1," in lines[0]
    assert lines[1].split() == ["rank", "index", "label", "score"]
    assert lines[2].split()[0] == "1" and lines[3].split()[0] == "2"
    assert lines[4].startswith(paths[1])
    assert "img/s" not in err  # no progress bar when no folder is given


def test_missing_file_is_reported_and_others_still_classified(
    grpc_server: Any, digit_images: list, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        ["classify", str(tmp_path / "nope.png"), str(digit_images[0].path), "--server", grpc_server.address]
    )
    out, _ = capsys.readouterr()
    assert code == 1
    assert "nope.png  ERROR INVALID_ARGUMENT: cannot read image" in out
    assert str(digit_images[0].path) + "  [hrnet v1" in out


def test_an_error_names_the_image_path_not_its_place_in_a_request(
    grpc_server: Any, digit_images: list, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(digit_images[1].png[:40])
    code = main(["classify", str(digit_images[0].path), str(corrupt), "--server", grpc_server.address])
    out, _ = capsys.readouterr()
    assert code == 1
    (line,) = [line for line in out.splitlines() if "ERROR" in line]
    assert line.startswith(f"{corrupt}  ERROR INVALID_ARGUMENT: ") and "image 0" not in line


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(["--model", "nope"], "model 'nope' is not served here"), (["--model-version", "7"], "version '7'")],
)
def test_an_unknown_model_or_version_is_one_line_and_exit_2(
    grpc_server: Any, digit_images: list, capsys: pytest.CaptureFixture, flags: list[str], expected: str
) -> None:
    paths = [str(i.path) for i in digit_images[:3]]
    code = main(["classify", *paths, "--server", grpc_server.address, *flags])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("hrnet classify: error: ") and "NOT_FOUND" in line and expected in line


def test_a_model_version_can_be_picked(
    grpc_server: Any, digit_images: list, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        ["classify", str(digit_images[0].path), "--server", grpc_server.address, "--model-version", "1"]
    )
    out, _ = capsys.readouterr()
    assert code == 0 and "[hrnet v1," in out
    assert main(["classify", "x.png", "--model-version", "newest"]) == 2
    assert "--model-version is a positive integer" in capsys.readouterr().err


def test_server_down_is_one_clear_line_and_exit_2(digit_images: list, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    code = main(["classify", str(digit_images[0].path), "--server", address])
    _, err = capsys.readouterr()
    assert code == 2
    assert f"cannot reach the server at {address}" in err and "UNAVAILABLE" in err
    assert "Traceback" not in err


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["classify", str(tmp_path)]) == 2  # an empty folder
    assert "no image files found" in capsys.readouterr().err
    assert main(["classify", "x.png", "--cert", "c.pem"]) == 2
    assert "--cert and --key" in capsys.readouterr().err
