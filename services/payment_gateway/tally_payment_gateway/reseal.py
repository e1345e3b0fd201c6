"""The token reseal job: moves saved payment tokens sealed under an older key to the active key,
so that the old key can be retired once no row needs it.

After a rotation (a new key listed and made active, the old ones still listed; see `crypto`),
rows sealed under an old key keep opening. Every `reseal_interval_seconds` this job walks
the merchant databases and, `reseal_batch_size` rows per transaction, opens each such
token and seals it again under the active key, bound to the same row.

- Replicas share the work: rows are claimed with `FOR UPDATE ... SKIP LOCKED`
  (`tally_kit.jobs.PeriodicJob`), and a row is replaced only while it still holds the token that
  was read (an UPDATE conditional on its key id and ciphertext): each token is resealed once,
  however many replicas run.
- Idempotent: only rows under a listed key other than the active one are claimed; a run with
  nothing to do changes nothing.
- A row sealed under a key that is no longer listed cannot be opened: it is never claimed nor
  changed, and it is reported at each walk of its merchant (an error line with the count by
  key id) and in the gauge below until its key is listed again. A row under a listed key that
  does not open (altered, or copied from another row) fails as an item of the job (logged,
  `tally_job_item_failures_total`) and stays as it is.

Metrics: `tally_payment_tokens_resealed_total`, and `tally_payment_tokens_under_old_keys{key_id}`:
the rows under each key other than the active one, as this process counted them at the start
of each merchant's walk, less those it resealed since. A key that shows 0 after a full walk
(or no longer shows) can be retired. The kit logs one line per batch (claimed, handled,
failed) and one per run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from uuid import UUID

import asyncpg
from prometheus_client import Counter, Gauge
from tally_kit.events.databases import MerchantDatabases
from tally_kit.jobs import PeriodicJob
from tally_kit.uow import Transaction

from tally_payment_gateway import store
from tally_payment_gateway.crypto import TokenVault
from tally_payment_gateway.settings import PaymentGatewaySettings
from tally_payment_gateway.store import PRODUCER

log = logging.getLogger(__name__)

JOB_NAME = "payment_token_reseal"

# Counted inside the batch's transaction: a batch that fails to commit is counted again when
# a later run reseals its rows.
tokens_resealed = Counter(
    "tally_payment_tokens_resealed_total", "Saved payment tokens moved to the active encryption key."
)
tokens_under_old_keys = Gauge(
    "tally_payment_tokens_under_old_keys",
    "Saved payment tokens sealed under a key other than the active one, by key id, as the reseal "
    "job last counted them; a key at 0 can be retired.",
    ["key_id"],
)


class _OldKeyCounts:
    """What `tokens_under_old_keys` shows: each merchant's count by key id, and their sums."""

    def __init__(self) -> None:
        self._by_merchant: dict[str, dict[str, int]] = {}
        self._totals: dict[str, int] = {}

    def recount(self, merchant_id: str, counts: Mapping[str, int]) -> None:
        previous = self._by_merchant.pop(merchant_id, {})
        if counts:
            self._by_merchant[merchant_id] = dict(counts)
        for key_id in previous.keys() | counts.keys():
            self._add(key_id, counts.get(key_id, 0) - previous.get(key_id, 0))

    def resealed(self, merchant_id: str, key_id: str) -> None:
        counts = self._by_merchant.get(merchant_id, {})
        # Only what was counted: a row written under that key after the count was not.
        if counts.get(key_id, 0) > 0:
            counts[key_id] -= 1
            self._add(key_id, -1)

    def _add(self, key_id: str, delta: int) -> None:
        self._totals[key_id] = self._totals.get(key_id, 0) + delta
        tokens_under_old_keys.labels(key_id).set(self._totals[key_id])


class ResealTokens:
    """The job's `ClaimedWork`: one saved payment method at a time, in id order."""

    def __init__(self, vault: TokenVault) -> None:
        self._vault = vault
        # Listed keys other than the active one: the rows under them can be resealed.
        self._old_key_ids = sorted(vault.key_ids - {vault.active_key_id})
        self._counts = _OldKeyCounts()

    async def claim(
        self,
        conn: asyncpg.Connection,
        merchant_id: str,
        *,
        now: datetime,
        after: UUID | None,
        limit: int,
    ) -> Sequence[UUID]:
        if after is None:
            await self._count(conn, merchant_id)
        if not self._old_key_ids:
            return []
        return await store.claim_tokens_under(conn, merchant_id, self._old_key_ids, after=after, limit=limit)

    async def handle(self, tx: Transaction, merchant_id: str, key: UUID, *, now: datetime) -> None:
        sealed = await store.get_sealed_token(tx.conn, merchant_id, key)
        # The row is locked since its claim; a handler still only acts on what it finds.
        if sealed is None or not self._vault.needs_reseal(sealed):
            return
        resealed = self._vault.reseal(sealed, associated_data=TokenVault.binding(merchant_id, key))
        if await store.replace_sealed_token(tx.conn, merchant_id, key, before=sealed, after=resealed):
            tokens_resealed.inc()
            self._counts.resealed(merchant_id, sealed.key_id)

    async def _count(self, conn: asyncpg.Connection, merchant_id: str) -> None:
        """Counts the merchant's tokens under other keys at the start of its walk, and reports
        those under keys no longer listed."""
        counts = await store.count_tokens_not_under(conn, merchant_id, self._vault.active_key_id)
        self._counts.recount(merchant_id, counts)
        unlisted = {key_id: tokens for key_id, tokens in counts.items() if key_id not in self._vault.key_ids}
        if unlisted:
            log.error(
                "merchant %s: %d saved payment tokens are sealed under keys that are not configured "
                "(%s); they cannot be opened or resealed until their key is listed again",
                merchant_id,
                sum(unlisted.values()),
                ", ".join(f"{key_id}: {tokens}" for key_id, tokens in sorted(unlisted.items())),
                extra={"merchant_id": merchant_id, "unlisted_key_ids": sorted(unlisted)},
            )


def build_job(
    databases: MerchantDatabases, vault: TokenVault, settings: PaymentGatewaySettings
) -> PeriodicJob[UUID]:
    """The job, every `reseal_interval_seconds`, `reseal_batch_size` rows per transaction."""
    return PeriodicJob(
        JOB_NAME,
        ResealTokens(vault),
        databases,
        producer=PRODUCER,
        interval_seconds=settings.reseal_interval_seconds,
        batch_size=settings.reseal_batch_size,
        stop_grace_seconds=settings.shutdown_grace_seconds,
    )
