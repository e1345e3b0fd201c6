"""Generate the one importable package of protobuf and gRPC code from `protos/`.

Output goes to `gen/` (`gen/tally/<service>/v1/*_pb2.py`, `*_pb2_grpc.py`, `*.pyi`),
which is on the virtual environment's path. Generated code is never edited by hand.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "gen"


def _googleapis_include() -> Path:
    import google.api  # googleapis-common-protos ships the .proto files beside the modules

    return Path(google.api.__path__[0]).parent.parent


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{_googleapis_include()}",
        f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *sources,
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return code
    # Regular packages (not namespace packages) so the `tally` package is unambiguous.
    for directory in [OUT / "tally", *(p for p in (OUT / "tally").rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    print(f"generated {len(sources)} proto files into {OUT.relative_to(ROOT)}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
