"""Static checks of the Dockerfile and .dockerignore (Docker itself cannot run here)."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

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


def test_runtime_has_the_fonts_the_receipt_service_sets_its_pdfs_in() -> None:
    # fonts-dejavu-core ships /usr/share/fonts/truetype/dejavu/DejaVuSans{,-Bold}.ttf.
    settings = (REPO / "services" / "receipt" / "tally_receipt" / "settings.py").read_text()
    fonts = re.findall(r'^DEJAVU_\w+ = "([^"]+)"$', settings, re.MULTILINE)
    assert fonts and all(font.startswith("/usr/share/fonts/truetype/dejavu/") for font in fonts), fonts
    runtime = DOCKERFILE.split("AS runtime", 1)[1]
    runtime_runs = [run for run in _instructions("RUN") if run in re.sub(r"\\\n", " ", runtime)]
    assert any(
        "apt-get install -y --no-install-recommends fonts-dejavu-core" in run
        and "rm -rf /var/lib/apt/lists/*" in run
        for run in runtime_runs
    ), "the runtime stage installs fonts-dejavu-core and drops apt's lists"


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


def _dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_dockerignore_sends_every_copied_source_and_nothing_local() -> None:
    patterns = _dockerignore_patterns()
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


def test_the_build_stage_builds_an_importable_environment_without_dev_tools(tmp_path: Path) -> None:
    """Runs the build stage's COPY and RUN steps outside Docker, with the project's own uv.

    `/app` becomes a scratch folder; the build context is the repository seen through
    .dockerignore. The result must import the kit, the catalog and the generated code, and hold
    no development dependency.
    """
    uv = REPO / ".tools" / "bin" / "uv"
    version = subprocess.run(
        [str(uv), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert version == _arg_default("UV_VERSION")
    build_stage = re.sub(r"\\\n", " ", DOCKERFILE.split("AS build", 1)[1].split("AS runtime", 1)[0])
    app = tmp_path / "app"
    app.mkdir()
    # The machine's environment carries its network settings (certificates, index); VIRTUAL_ENV
    # would point uv at the caller's environment.
    environment = {name: value for name, value in os.environ.items() if name != "VIRTUAL_ENV"}
    environment["PATH"] = f"{uv.parent}{os.pathsep}{os.environ['PATH']}"
    patterns = _dockerignore_patterns()
    for line in build_stage.splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                # An image layer keeps no cache; here the developer's cache spares the downloads.
                if name != "UV_NO_CACHE":
                    environment[name] = value.replace("/app", str(app))
        elif keyword == "COPY":
            *sources, destination = rest.split()
            for source in sources:
                _copy_context(source, destination, app, patterns)
        elif keyword == "RUN" and "pip install" not in rest:
            step = subprocess.run(
                ["bash", "-c", rest], cwd=app, env=environment, capture_output=True, text=True
            )
            assert step.returncode == 0, f"RUN {rest}\n{step.stderr}"
    probe = "import tally_kit.server, tally_catalog, tally.common.v1.money_pb2, grpc_health.v1.health_pb2"
    python = str(app / ".venv" / "bin" / "python")
    subprocess.run([python, "-c", probe], cwd=tmp_path, check=True, capture_output=True)
    dev_only = subprocess.run([python, "-c", "import pytest"], cwd=tmp_path, capture_output=True)
    assert dev_only.returncode != 0, "development dependencies must stay out of the image"


def _copy_context(source: str, destination: str, workdir: Path, patterns: list[str]) -> None:
    """COPY `source` from the build context as Docker does: ignored paths are not in the context."""
    origin = REPO / source
    files = [origin] if origin.is_file() else sorted(path for path in origin.rglob("*") if path.is_file())
    for path in files:
        if _ignored(path.relative_to(REPO).as_posix(), patterns):
            continue
        if origin.is_dir():
            target = workdir / destination / path.relative_to(origin)
        elif destination.endswith("/"):
            target = workdir / destination / path.name
        else:
            target = workdir / destination
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
