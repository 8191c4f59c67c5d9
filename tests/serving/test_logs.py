"""The server's log stays one JSON object per line, whatever else in the process writes to it."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import io, logging, warnings
from PIL import Image
from serving.logs import configure
from serving.engine.preprocess import decode_image
configure("json", "info")
logging.getLogger("serving").info("before", extra={"n": 1})
palette = Image.new("P", (4, 4))
palette.info["transparency"] = b"\\\\x00" * 256  # Pillow warns when such an image is converted
buffer = io.BytesIO()
palette.save(buffer, "PNG")
decode_image(buffer.getvalue())
warnings.warn("a library's own warning")
"""


def test_warnings_become_json_records() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]  # every line parses
    assert records[0]["msg"] == "before" and records[0]["n"] == 1
    warned = [r["msg"] for r in records if r["logger"] == "py.warnings" and r["level"] == "warning"]
    assert any("Palette images with Transparency" in m for m in warned)  # Pillow's, from decoding
    assert any("a library's own warning" in m for m in warned)
