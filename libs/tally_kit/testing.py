"""Helpers for tests that talk to the real PostgreSQL and RabbitMQ.

Each test run gets a unique database prefix, so runs never see each other's databases,
and drops every database carrying it when it ends (each database is several MB).
"""

from __future__ import annotations

import secrets

import asyncpg

from tally_kit.settings import ServiceSettings


def unique_prefix() -> str:
    """A database-name prefix unique to one test run, e.g. `t3fa9c1_`."""
    return f"t{secrets.token_hex(3)}_"


async def drop_databases(settings: ServiceSettings, prefix: str) -> list[str]:
    """Drop every database whose name starts with `prefix`; returns the names dropped."""
    if not prefix:
        raise ValueError("refusing to drop databases without a prefix")
    conn = await asyncpg.connect(
        host=settings.pg_host,
        port=settings.pg_port,
        user=settings.pg_user,
        password=settings.pg_password.get_secret_value() or None,
        database="postgres",
    )
    try:
        names = [
            r["datname"]
            for r in await conn.fetch(
                "SELECT datname FROM pg_database WHERE starts_with(datname, $1)", prefix
            )
        ]
        for name in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return names
    finally:
        await conn.close()
