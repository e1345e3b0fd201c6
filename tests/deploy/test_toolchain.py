"""The deploy toolchain runs the project's own versions of what both environments share."""

from __future__ import annotations

import re
import tomllib

from .conftest import REPO

SHARED = ("grpcio", "grpcio-health-checking", "protobuf", "pytest", "pytest-asyncio", "pytest-timeout")


def test_shared_packages_are_pinned_to_the_locked_versions() -> None:
    locked = {
        package["name"]: package["version"]
        for package in tomllib.loads((REPO / "uv.lock").read_text())["package"]
    }
    pins = dict(
        re.findall(
            r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "tests/deploy/requirements.txt").read_text(), re.MULTILINE
        )
    )
    assert {name: pins[name] for name in SHARED} == {name: locked[name] for name in SHARED}
