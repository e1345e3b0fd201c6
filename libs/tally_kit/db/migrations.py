"""Versioned, checksummed SQL migrations, applied once per database under an advisory lock.

A component (`kit`, `control`, a service) keeps its migrations in one folder as
`NNNN_<name>.sql`. Each file runs in its own transaction together with its row in
`schema_migrations`, so a crash leaves it either applied and recorded or neither. Files
therefore must not manage transactions themselves (no BEGIN/COMMIT, no
`CREATE INDEX CONCURRENTLY`).

History is immutable: a file whose content changed after it was applied, or a new file
numbered below one already applied, is refused before anything runs, because the
databases that already moved past it would never get it and the rest would differ.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")

# Advisory locks are scoped to the database, so one fixed key serialises every
# migrating process on that database and no other.
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"tally_kit.db.migrations").digest()[:8], "big", signed=True)

_CREATE_HISTORY = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component  text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


class MigrationError(RuntimeError):
    """A migration folder or history that cannot be applied safely."""


@dataclass(frozen=True)
class MigrationSource:
    component: str
    directory: Path


@dataclass(frozen=True)
class Migration:
    component: str
    version: int
    name: str
    path: Path
    sql: str
    checksum: str

    @property
    def label(self) -> str:
        return f"{self.component}/{self.path.name}"


KIT_MIGRATIONS = MigrationSource("kit", Path(__file__).resolve().parent.parent / "migrations")


def load_migrations(source: MigrationSource) -> list[Migration]:
    """The source's migrations in version order; refuses misnamed files and duplicate versions."""
    migrations: list[Migration] = []
    for path in sorted(source.directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{source.component}/{path.name}: migration files are named NNNN_<name>.sql")
        content = path.read_bytes()
        migrations.append(
            Migration(
                component=source.component,
                version=int(match["version"]),
                name=match["name"],
                path=path,
                sql=content.decode("utf-8"),
                checksum=hashlib.sha256(content).hexdigest(),
            )
        )
    migrations.sort(key=lambda m: m.version)
    for previous, current in itertools.pairwise(migrations):
        if previous.version == current.version:
            raise MigrationError(f"{previous.label} and {current.label} share version {current.version}")
    return migrations


async def apply_migrations(conn: asyncpg.Connection, sources: Sequence[MigrationSource]) -> list[str]:
    """Applies the pending migrations of each source, in the order given.

    Returns the labels (`<component>/<file>`) of the migrations this call applied; a
    concurrent caller that found them already applied gets an empty list.
    """
    loaded = [load_migrations(source) for source in sources]
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(_CREATE_HISTORY)
        history = await conn.fetch("SELECT component, version, checksum FROM schema_migrations")
        pending = _pending(loaded, history)
        for migration in pending:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    """
                    INSERT INTO schema_migrations (component, version, name, checksum)
                    VALUES ($1, $2, $3, $4)
                    """,
                    migration.component,
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
        return [migration.label for migration in pending]
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


def _pending(loaded: list[list[Migration]], history: list[asyncpg.Record]) -> list[Migration]:
    """What is left to apply, after checking the files against what was applied."""
    applied = {(row["component"], row["version"]): row["checksum"] for row in history}
    pending: list[Migration] = []
    for migrations in loaded:
        for migration in migrations:
            checksum = applied.get((migration.component, migration.version))
            if checksum is None:
                pending.append(migration)
            elif checksum != migration.checksum:
                raise MigrationError(
                    f"{migration.label} was changed after it was applied "
                    f"(applied checksum {checksum}, file checksum {migration.checksum}); "
                    "add a new migration instead"
                )
    for migration in pending:
        newest = max((v for c, v in applied if c == migration.component), default=0)
        if migration.version < newest:
            raise MigrationError(
                f"{migration.label} is numbered below version {newest}, already applied "
                f"for component '{migration.component}'; renumber it above {newest}"
            )
    return pending
