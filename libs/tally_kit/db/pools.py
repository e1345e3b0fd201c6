"""Bounded asyncpg pools: one per database in use, least recently used closed first, all
under one ceiling on the connections the process holds.

The ceiling counts open connections, not checked-out ones, because that is what the
PostgreSQL server runs out of. Every connection any pool opens first takes a slot; its
slot is given back when the connection closes, whatever closes it. A caller that needs a
connection while every slot is taken frees what is idle (pools nobody is using are
closed) and then waits; while anyone waits, a connection given back is closed rather than
kept idle, so its slot goes to a waiter and no merchant starves the others.

A connection goes back to its pool without a round trip to the server. asyncpg's default
reset runs `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` on every release,
which on a short read costs as much as the read itself. None of it is needed when the
session is left as it was found, and that is the contract of `connection()`: what a caller
changes inside a transaction (SET LOCAL, transaction advisory locks, cursors) ends with the
transaction, which asyncpg rolls back on release if the caller left one open; outside a
transaction a caller must not change the session (SET, LISTEN, session advisory locks,
WITH HOLD cursors). A caller that does, such as the migrations with their session advisory
lock, says so with `changes_session=True`, and its connection gets the full reset (or is
terminated if that fails) before anyone else can use it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import asyncpg
from prometheus_client import Counter, Gauge

from tally_kit.errors import Unavailable

log = logging.getLogger(__name__)

# Idle connections are closed after this long, freeing server connections for the other
# services and developers sharing the server.

POOLS_OPEN = Gauge("tally_db_pools_open", "Database connection pools open, evicted ones until they close")
CONNECTIONS_MAX = Gauge("tally_db_connections_max", "Ceiling on the database connections the process holds")
CONNECTIONS_OPEN = Gauge("tally_db_connections_open", "Database connections open across every pool")
CONNECTIONS_IN_USE = Gauge("tally_db_connections_in_use", "Database connections checked out by callers")
POOL_EVICTIONS = Counter(
    "tally_db_pool_evictions_total", "Pools closed to stay under the pool limit or to free connections"
)


def server_address(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DatabaseAddress(NamedTuple):
    """Where a database lives. A tuple: it keys the pools on every call, and a tuple's
    hash and equality run in C where a dataclass's run in Python."""

    server: str  # "host:port"
    database: str

    @property
    def host(self) -> str:
        return self.server.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.server.rpartition(":")[2])


@dataclass(eq=False)
class _PoolEntry:
    address: DatabaseAddress
    pool: asyncpg.Pool
    max_size: int
    # Callers holding or waiting for one of the pool's connections.
    users: int = 0
    # Evicted: no new caller gets this pool; it closes once its users are gone.
    retired: bool = False
    closing: asyncio.Task[None] | None = None


class BoundedPools:
    """Pools keyed by database; `pin` opens one that is never evicted (the control database's)."""

    def __init__(
        self,
        *,
        user: str,
        password: str | None,
        application_name: str,
        max_pools: int,
        pool_max_size: int,
        max_connections: int,
        acquire_timeout: float,
        command_timeout: float,
        idle_connection_seconds: float,
    ) -> None:
        self._user = user
        self._password = password
        self._application_name = application_name
        self._max_pools = max_pools
        self._pool_max_size = pool_max_size
        self._acquire_timeout = acquire_timeout
        self._command_timeout = command_timeout
        self._idle_connection_seconds = idle_connection_seconds
        self._max_connections = max_connections
        self._slots = asyncio.Semaphore(max_connections)
        CONNECTIONS_MAX.inc(max_connections)
        self._slot_waiters = 0
        # Evictable pools, least recently used first.
        self._pools: OrderedDict[DatabaseAddress, _PoolEntry] = OrderedDict()
        self._pinned: dict[DatabaseAddress, _PoolEntry] = {}
        # Retired pools still in use, closed when their last user leaves.
        self._draining: set[_PoolEntry] = set()
        self._create_lock = asyncio.Lock()
        self._closed = False

    async def pin(self, address: DatabaseAddress, *, max_size: int) -> None:
        if address not in self._pinned:
            self._pinned[address] = _PoolEntry(address, await self._create_pool(address, max_size), max_size)

    def connection(
        self, address: DatabaseAddress, *, changes_session: bool = False
    ) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A pooled connection; `changes_session` if the caller changes session state (see above)."""
        return _Lease(self, address, changes_session)

    @asynccontextmanager
    async def direct_connection(self, address: DatabaseAddress) -> AsyncIterator[asyncpg.Connection]:
        """A connection outside any pool (to a server's maintenance database), still under the ceiling.

        It has no command timeout: it is for statements such as CREATE DATABASE that may
        legitimately take long on a busy server.
        """
        try:
            conn = await self._open_connection(**self._connect_arguments(address))
        except TimeoutError:
            raise self._exhausted() from None
        try:
            yield conn
        finally:
            await _close_quietly(conn)

    async def close(self) -> None:
        """Closes every pool, each once its connections in use are released."""
        if self._closed:
            return
        self._closed = True
        CONNECTIONS_MAX.dec(self._max_connections)
        entries = [*self._pinned.values(), *self._pools.values(), *self._draining]
        self._pinned.clear()
        self._pools.clear()
        self._draining.clear()
        for entry in entries:
            self._close_in_background(entry)
        await asyncio.gather(*(entry.closing for entry in entries if entry.closing is not None))

    async def _lend(self, address: DatabaseAddress) -> tuple[_PoolEntry, asyncpg.Connection]:
        """The pool of `address` (opened if need be) and one of its connections.

        Every call runs this: a pool in use is found with two dict lookups and no lock.
        """
        entry = self._pinned.get(address)
        if entry is None:
            entry = self._pools.get(address)
            if entry is None:
                entry = await self._open_entry(address)
            self._pools.move_to_end(address)
        # Fewer users than connections: one is idle, or there is room to open one (which
        # _open_connection bounds by the acquire timeout), so no waiting in the pool's queue
        # and no timer to arm and cancel, as every call would otherwise.
        may_wait = entry.users >= entry.max_size
        entry.users += 1
        try:
            conn = await entry.pool.acquire(timeout=self._acquire_timeout if may_wait else None)
        except BaseException as error:
            self._user_left(entry)
            if isinstance(error, TimeoutError):
                raise self._exhausted() from None
            raise
        CONNECTIONS_IN_USE.inc()
        return entry, cast(asyncpg.Connection, conn)

    async def _give_back(self, entry: _PoolEntry, conn: asyncpg.Connection, changes_session: bool) -> None:
        CONNECTIONS_IN_USE.dec()
        try:
            try:
                if self._slot_waiters:
                    await _close_quietly(conn)
                elif changes_session:
                    await self._reset_session(conn)
            finally:
                await entry.pool.release(conn)
        finally:
            self._user_left(entry)

    def _user_left(self, entry: _PoolEntry) -> None:
        entry.users -= 1
        if entry.users == 0:
            if entry.retired:
                self._close_in_background(entry)
            elif self._slot_waiters and self._pools.get(entry.address) is entry:
                del self._pools[entry.address]
                self._retire(entry)

    async def _open_entry(self, address: DatabaseAddress) -> _PoolEntry:
        async with self._create_lock:
            entry = self._pools.get(address)
            if entry is None:
                if len(self._pools) >= self._max_pools:
                    _, least_recently_used = self._pools.popitem(last=False)
                    self._retire(least_recently_used)
                pool = await self._create_pool(address, self._pool_max_size)
                entry = _PoolEntry(address, pool, self._pool_max_size)
                self._pools[address] = entry
        return entry

    async def _create_pool(self, address: DatabaseAddress, max_size: int) -> asyncpg.Pool:
        if self._closed:
            raise RuntimeError("the database pools are closed")
        pool = await asyncpg.create_pool(
            min_size=0,  # opens no connection until one is needed
            max_size=max_size,
            max_inactive_connection_lifetime=self._idle_connection_seconds,
            connect=self._open_connection,
            reset=_keep_session,
            command_timeout=self._command_timeout,
            **self._connect_arguments(address),
        )
        POOLS_OPEN.inc()
        return pool

    def _connect_arguments(self, address: DatabaseAddress) -> dict[str, Any]:
        return {
            "host": address.host,
            "port": address.port,
            "user": self._user,
            "password": self._password,
            "database": address.database,
            "server_settings": {"application_name": self._application_name},
        }

    async def _open_connection(self, *args: Any, **kwargs: Any) -> asyncpg.Connection:
        """Every connection, pooled or not, is opened here: a slot, then the connection, both
        within the acquire timeout (TimeoutError otherwise)."""
        async with asyncio.timeout(self._acquire_timeout):
            if self._slots.locked():
                self._reclaim_idle_pool()
            self._slot_waiters += 1
            try:
                await self._slots.acquire()
            finally:
                self._slot_waiters -= 1
            try:
                conn = await asyncpg.connect(*args, **kwargs)
            except BaseException:
                self._slots.release()
                raise
            CONNECTIONS_OPEN.inc()
            conn.add_termination_listener(self._on_connection_closed)
        return conn

    def _on_connection_closed(self, _conn: asyncpg.Connection) -> None:
        CONNECTIONS_OPEN.dec()
        self._slots.release()

    def _reclaim_idle_pool(self) -> None:
        """Closes the least recently used pool that holds connections nobody is using."""
        for address, entry in self._pools.items():
            if entry.users == 0 and entry.pool.get_size() > 0:
                del self._pools[address]
                self._retire(entry)
                return

    def _retire(self, entry: _PoolEntry) -> None:
        entry.retired = True
        POOL_EVICTIONS.inc()
        if entry.users == 0:
            self._close_in_background(entry)
        else:
            self._draining.add(entry)

    def _close_in_background(self, entry: _PoolEntry) -> None:
        if entry.closing is None:
            self._draining.discard(entry)
            entry.closing = asyncio.create_task(self._close_pool(entry))

    @staticmethod
    async def _close_pool(entry: _PoolEntry) -> None:
        try:
            await entry.pool.close()
        except Exception:
            log.exception("closing the pool of %s failed; its connections were terminated", entry.address)
        finally:
            POOLS_OPEN.dec()

    async def _reset_session(self, conn: asyncpg.Connection) -> None:
        """asyncpg's full reset; a session that cannot be reset is terminated, never lent again."""
        try:
            await conn.reset(timeout=self._command_timeout)
        except BaseException as error:
            conn.terminate()
            if not isinstance(error, Exception):
                raise
            log.warning("resetting a database session failed; its connection was terminated", exc_info=True)

    def _exhausted(self) -> Unavailable:
        return Unavailable(
            f"no database connection became free within {self._acquire_timeout:g} s",
            reason="DB_CONNECTIONS_EXHAUSTED",
        )


class _Lease:
    """`async with pools.connection(address) as conn`: a class rather than a generator-based
    context manager, which would cost an async generator and its plumbing on every call."""

    __slots__ = ("_address", "_changes_session", "_conn", "_entry", "_pools")

    def __init__(self, pools: BoundedPools, address: DatabaseAddress, changes_session: bool) -> None:
        self._pools = pools
        self._address = address
        self._changes_session = changes_session

    async def __aenter__(self) -> asyncpg.Connection:
        self._entry, self._conn = await self._pools._lend(self._address)
        return self._conn

    async def __aexit__(self, *exc_info: object) -> None:
        await self._pools._give_back(self._entry, self._conn, self._changes_session)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pools' reset on release: nothing beyond asyncpg's own rollback (see the module doc)."""


async def _close_quietly(conn: Any) -> None:
    """Closes a connection; a failure already aborted it, which frees its slot just the same."""
    try:
        await conn.close()
    except Exception:
        log.warning("closing a database connection failed; it was aborted", exc_info=True)
