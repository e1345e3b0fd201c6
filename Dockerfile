# syntax=docker/dockerfile:1
#
# One image for every Tally service; the command picks the service, e.g.
#   docker run tally:dev python -m tally_catalog            (serve)
#   docker run tally:dev python -m tally_catalog migrate    (create/migrate databases)
# Settings come from the environment at run time (CATALOG_PG_HOST, ...); no secret is baked in.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ARG UV_VERSION=0.13.8
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_PYTHON=python3.11 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1

RUN python -m pip install "uv==${UV_VERSION}"

WORKDIR /app

# Dependencies first: this layer is rebuilt only when the lock changes, not on every source edit.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project

COPY protos ./protos
COPY scripts/gen_protos.py ./scripts/gen_protos.py
COPY libs ./libs
COPY services ./services

# The project goes in as an editable install, as in development: its .pth file puts /app/libs,
# /app/services/<service> and /app/gen on sys.path, which is why the runtime stage keeps /app as is.
RUN uv sync --frozen --no-dev \
    && .venv/bin/python scripts/gen_protos.py \
    && .venv/bin/python -m compileall -q libs services gen


FROM ${PYTHON_IMAGE} AS runtime

# The receipt service sets its PDFs in DejaVu Sans (its settings' default font files) and
# refuses to start without them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/*

ARG TALLY_UID=10001
RUN groupadd --system --gid "${TALLY_UID}" tally \
    && useradd --system --uid "${TALLY_UID}" --gid tally --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin tally

WORKDIR /app
# Owned by root and not writable by the service user: the root filesystem can be mounted read-only.
COPY --from=build /app /app

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# gRPC ports of catalog, ledger, payment-gateway, subscription-scheduler, loyalty, receipt;
# their metrics ports in the same order; the HTTP gateway; the PSP simulator.
EXPOSE 50051-50056 9101-9106 8080 8090

USER ${TALLY_UID}:${TALLY_UID}

CMD ["python", "-m", "tally_catalog"]
