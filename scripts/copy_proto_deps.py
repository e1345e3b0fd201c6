"""Copy the googleapis .proto files Tally's protos import into a folder buf can read.

buf resolves `google/api/annotations.proto` from its registry, which is not reachable
here; googleapis-common-protos ships the same files, so buf reads them from there.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import google.api

PACKAGES = ("google/api", "google/rpc", "google/type")


def main(target: str) -> int:
    source_root = Path(google.api.__path__[0]).parent.parent
    destination = Path(target)
    if destination.exists():
        shutil.rmtree(destination)
    for package in PACKAGES:
        for proto in (source_root / package).glob("*.proto"):
            out = destination / package / proto.name
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(proto, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
