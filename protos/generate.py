"""Regenerate the Python code for every `.proto` file in this folder (`make proto`).

The generated modules are committed, so a client install needs no protoc. protoc runs with the
repository root as include path, which makes the generated imports read `from protos import
x_pb2`: the package works wherever `protos` is importable. `tests/protos` regenerates into a
temporary folder and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Write `protos/*_pb2.py`, `*_pb2_grpc.py` and `*_pb2.pyi` under `out_dir`; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    sources = [str(p.relative_to(ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(sources)}")
    return sorted(
        path for stem in (p.stem for p in proto_files()) for path in (out_dir / "protos").glob(f"{stem}_pb2*")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="root under which protos/ is written")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
