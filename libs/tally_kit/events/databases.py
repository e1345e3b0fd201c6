"""What the relay and the consumer need from a service's merchant databases.

`tally_kit.db.directory.MerchantDirectory` satisfies it; tests may use any small stand-in.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

import asyncpg


class MerchantDatabases(Protocol):
    async def merchant_ids(self) -> list[str]:
        """Every merchant that has a database for this service."""
        ...

    def transaction(self, merchant_id: str) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A connection to the merchant's database inside a transaction, committed on exit."""
        ...

    def connection(self, merchant_id: str) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A connection to the merchant's database, outside any transaction."""
        ...
