"""Static checks of the Dockerfile and .dockerignore (Docker itself cannot run here)."""

from __future__ import annotations

import fnmatch
import re

from .conftest import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
INSTRUCTIONS = [
    line.strip()
    for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]
PLANNED_PORTS = {50051, 50052, 50053, 50054, 50055, 50056, 9101, 9102, 9103, 9104, 9105, 9106, 8080, 8090}
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|TOKEN|AMQP_URL|PRIVATE", re.IGNORECASE)


def _instructions(keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in INSTRUCTIONS if line.split(None, 1)[0].upper() == keyword]


def _arg_default(name: str) -> str:
    for arg in _instructions("ARG"):
        key, _, value = arg.partition("=")
        if key == name:
            return value
    raise AssertionError(f"ARG {name} is not declared")


def test_base_image_is_a_pinned_slim_python_311() -> None:
    image = _arg_default("PYTHON_IMAGE")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", image), image
    stages = _instructions("FROM")
    assert stages == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]


def test_uv_is_the_version_the_makefile_pins() -> None:
    makefile_uv = re.search(r"^UV_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert makefile_uv is not None
    assert _arg_default("UV_VERSION") == makefile_uv.group(1)
    assert any('pip install "uv==${UV_VERSION}"' in run for run in _instructions("RUN"))


def test_dependencies_come_from_the_lock_without_dev_tools_and_protos_are_generated() -> None:
    runs = " ".join(_instructions("RUN"))
    assert "uv sync --frozen --no-dev --no-install-project" in runs
    assert re.search(r"uv sync --frozen --no-dev\s+&&", runs), "the project itself is installed from the lock"
    assert "scripts/gen_protos.py" in runs


def test_runtime_runs_as_a_numeric_non_root_user() -> None:
    runtime = DOCKERFILE.split("AS runtime", 1)[1]
    users = re.findall(r"^USER (\S+)$", runtime, re.MULTILINE)
    assert users == ["${TALLY_UID}:${TALLY_UID}"]
    assert int(_arg_default("TALLY_UID")) >= 10000


def test_no_secret_is_baked_into_the_image() -> None:
    for keyword in ("ENV", "ARG", "LABEL"):
        for instruction in _instructions(keyword):
            assert not SECRET_WORDS.search(instruction), f"{keyword} {instruction}"


def test_every_planned_port_is_exposed() -> None:
    exposed: set[int] = set()
    for spec in " ".join(_instructions("EXPOSE")).split():
        low, _, high = spec.partition("-")
        exposed.update(range(int(low), int(high or low) + 1))
    assert exposed == PLANNED_PORTS


def test_default_command_starts_the_catalog_without_a_shell() -> None:
    assert _instructions("CMD") == ['["python", "-m", "tally_catalog"]']


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a directory covers its contents."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(candidate, pattern) for candidate in candidates) or (
            pattern.startswith("**/") and any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        ):
            ignored = not negated
    return ignored


def test_dockerignore_sends_every_copied_source_and_nothing_local() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = []
    for copy in _instructions("COPY"):
        if copy.startswith("--from="):
            continue
        copied.extend(copy.split()[:-1])
    assert copied, "the build stage copies sources"
    for source in copied:
        assert not _ignored(source.rstrip("/"), patterns), f"{source} is excluded from the build context"
    local_only = (
        ".venv",
        ".tools",
        ".git",
        "gen",
        "libs/tests/test_x.py",
        "services/catalog/tests/test_x.py",
        "libs/tally_kit/__pycache__/x.pyc",
        "helm",
        "deploy",
    )
    for local in local_only:
        assert _ignored(local, patterns), f"{local} would be sent to the Docker daemon"
