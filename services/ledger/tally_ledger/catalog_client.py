"""`GrpcCatalogReader`: the ledger's `CatalogReader` over the catalog's gRPC API, with a cache.

Every call is a read, so the channel retries each on UNAVAILABLE (`tally_kit.clients`); it
forwards the caller's token when there is one and otherwise sends the ledger's own service
token (event consumers and jobs have no caller).

What is cached, and for how long
--------------------------------
- Products are immutable templates but for archiving, which is final: an archived product
  is kept until the cache evicts it; an active one is read again after `ttl_seconds`, so
  that its archiving is seen.
- Operation types: the versions of one code, with the instant they were read. A version
  never changes once it exists except that its end is set when its successor is scheduled,
  and a successor starts now or later, never in the past. So the list read at T answers for
  certain any instant before the end of the version then in effect (a closed version keeps
  its end), any instant before the first version starts, and any instant up to T. Past T
  the latest version may have been succeeded since; the list is then read again, except
  within `rate_staleness_seconds` of T, when the answer of T is taken as current. A new
  rate effective immediately therefore reaches the ledger within that window; a rate
  scheduled further ahead than the window is applied from its exact start.
- Merchant terms and the sign-up grant list change rarely: read again after `ttl_seconds`.
- Not-found answers are not cached.
All of it lives in one bounded LRU, keyed by merchant first, so one merchant's entries are
never answered for another.

When the catalog cannot answer (down, circuit open, deadline, internal error, or it refuses
the ledger's credentials), a cached value is served even past its freshness
(`stale_served`); with nothing cached the read fails with UNAVAILABLE, reason
CATALOG_UNAVAILABLE. Reads of the same key in flight at once share one call.

Metrics: `tally_catalog_cache_requests_total{kind, result}`, result `hit` (answered from the
cache), `miss` (asked the catalog, whatever it answered) or `stale_served`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

import grpc
from prometheus_client import Counter
from tally.catalog.v1 import catalog_service_pb2 as api
from tally.catalog.v1 import catalog_service_pb2_grpc
from tally.catalog.v1 import resources_pb2 as res
from tally_kit.amounts import parse_credits
from tally_kit.clients import BreakerPolicy, RetryPolicy, TokenSource, open_channel
from tally_kit.db import is_valid_merchant_id
from tally_kit.errors import FailedPrecondition, NotFound, Unavailable
from tally_kit.status import UpstreamError, error_from_rpc

from tally_ledger.catalog import Distribution, GrantPolicy, MerchantTerms, ProductTemplate
from tally_ledger.domain import OperationRate

log = logging.getLogger(__name__)

CATALOG_UNAVAILABLE = "CATALOG_UNAVAILABLE"
# Every RPC the ledger sends the catalog; all are reads, hence safe to retry.
READ_METHODS = ("GetMerchant", "GetProduct", "ListProducts", "ListOperationTypeVersions")
# The catalog's own pattern: a code outside it names no operation type.
OPERATION_CODE_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
# The largest page the catalog serves.
PAGE_SIZE = 500
DEFAULT_RETRY = RetryPolicy()
DEFAULT_BREAKER = BreakerPolicy()

cache_requests = Counter(
    "tally_catalog_cache_requests_total",
    "Reads of catalog data by the ledger, by what answered them: the cache (hit), the catalog "
    "(miss) or the cache past its freshness while the catalog could not answer (stale_served).",
    ("kind", "result"),
)

# Codes by which the catalog answers about the data; every other failure means it cannot answer.
_ANSWER_CODES = frozenset(
    {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT}
)
# Refusals of the ledger's credentials: the catalog is up but the deployment is misconfigured.
_CREDENTIAL_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})

_DISTRIBUTIONS = {
    res.PRODUCT_DISTRIBUTION_SELLABLE: Distribution.SELLABLE,
    res.PRODUCT_DISTRIBUTION_GRANT: Distribution.GRANT,
}
_GRANT_POLICIES = {
    res.GRANT_POLICY_APPLY_ON_SIGNUP: GrantPolicy.APPLY_ON_SIGNUP,
    res.GRANT_POLICY_MANUAL_GRANT: GrantPolicy.MANUAL_GRANT,
}

V = TypeVar("V")


@dataclass(frozen=True)
class CachePolicy:
    """How much the reader keeps and how long it trusts what it keeps."""

    max_entries: int = 10_000
    # Merchant terms and sign-up grant lists are read again after this long, and an active
    # product is checked again for archiving.
    ttl_seconds: float = 60.0
    # How long after it was read the latest version of an operation type is taken as still
    # the latest (see the module's docstring).
    rate_staleness_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if self.ttl_seconds < 0 or self.rate_staleness_seconds < 0:
            raise ValueError("ttl_seconds and rate_staleness_seconds must be 0 or more")


@dataclass(frozen=True)
class _Version:
    rate: OperationRate
    starts_at: datetime
    # None while it is the latest version.
    ends_at: datetime | None


@dataclass(frozen=True)
class _Timeline:
    """The versions of one operation code, by start, as read at `read_at`."""

    operation_code: str
    versions: tuple[_Version, ...]
    read_at: datetime

    def version_at(self, at: datetime) -> _Version | None:
        for version in reversed(self.versions):
            if version.starts_at <= at:
                return version
        return None

    def covers(self, at: datetime, staleness: timedelta) -> bool:
        """Whether the answer for `at` is known for certain (or fresh enough)."""
        version = self.version_at(at)
        if version is None or (version.ends_at is not None and at < version.ends_at):
            # Before the first version, or inside a closed one: neither ever changes.
            return True
        return at <= self.read_at + staleness

    def rate_at(self, merchant_id: str, at: datetime) -> OperationRate:
        version = self.version_at(at)
        if version is None:
            raise FailedPrecondition(
                f"operation type {self.operation_code} has no version in effect at {at.isoformat()}; "
                f"its first starts at {self.versions[0].starts_at.isoformat()}",
                reason="OPERATION_TYPE_NOT_ACTIVE",
                metadata={"merchant_id": merchant_id, "operation_code": self.operation_code},
            )
        return version.rate


@dataclass
class _Entry:
    value: Any
    # Monotonic instant after which the value is read again; math.inf: never for freshness.
    fresh_until: float


class _LruCache:
    """At most `max_entries` entries; the least recently used go first."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class _CatalogCannotAnswer(Exception):
    """The catalog gave no answer about the data (outage, open circuit, internal error)."""


class GrpcCatalogReader:
    """The ledger's `CatalogReader` (see `tally_ledger.catalog`) over a channel to the catalog."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        cache: CachePolicy = CachePolicy(),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._channel = channel
        self._stub = catalog_service_pb2_grpc.CatalogServiceStub(channel)
        self._policy = cache
        self._rate_staleness = timedelta(seconds=cache.rate_staleness_seconds)
        self._clock = clock
        self._cache = _LruCache(cache.max_entries)
        self._in_flight: dict[Hashable, asyncio.Future[Any]] = {}

    @classmethod
    def open(
        cls,
        target: str,
        *,
        service_token: TokenSource,
        timeout_seconds: float = 2.0,
        cache: CachePolicy = CachePolicy(),
        retry: RetryPolicy = DEFAULT_RETRY,
        breaker: BreakerPolicy = DEFAULT_BREAKER,
    ) -> GrpcCatalogReader:
        """A reader over a new channel to the catalog at `target` (`host:port`)."""
        channel = open_channel(
            target,
            name="catalog",
            timeout_seconds=timeout_seconds,
            safe_methods=READ_METHODS,
            service_token=service_token,
            retry=retry,
            breaker=breaker,
        )
        return cls(channel, cache=cache)

    async def close(self) -> None:
        await self._channel.close()

    # --- CatalogReader ----------------------------------------------------------------------

    async def product(self, merchant_id: str, product_id: UUID) -> ProductTemplate:
        _check_merchant_id(merchant_id)

        def lifetime(product: ProductTemplate) -> float:
            # Archiving is final; an active product may yet be archived.
            return math.inf if product.archived else self._policy.ttl_seconds

        return await self._read(
            (merchant_id, "product", product_id),
            kind="product",
            fetch=lambda: self._fetch_product(merchant_id, product_id),
            lifetime=lifetime,
        )

    async def signup_products(self, merchant_id: str) -> list[ProductTemplate]:
        _check_merchant_id(merchant_id)
        products: tuple[ProductTemplate, ...] = await self._read(
            (merchant_id, "signup_products"),
            kind="signup_products",
            fetch=lambda: self._fetch_signup_products(merchant_id),
            lifetime=lambda _: self._policy.ttl_seconds,
        )
        return list(products)

    async def operation_rate(self, merchant_id: str, operation_code: str, at: datetime) -> OperationRate:
        _check_merchant_id(merchant_id)
        if at.tzinfo is None:
            raise ValueError("`at` must be an aware datetime")
        if not OPERATION_CODE_PATTERN.fullmatch(operation_code):
            raise _operation_type_not_found(merchant_id, operation_code)
        timeline: _Timeline = await self._read(
            (merchant_id, "operation_type", operation_code),
            kind="operation_rate",
            fetch=lambda: self._fetch_timeline(merchant_id, operation_code),
            lifetime=lambda _: math.inf,
            covers=lambda cached: cached.covers(at, self._rate_staleness),
        )
        return timeline.rate_at(merchant_id, at)

    async def merchant_terms(self, merchant_id: str) -> MerchantTerms:
        _check_merchant_id(merchant_id)
        return await self._read(
            (merchant_id, "terms"),
            kind="merchant_terms",
            fetch=lambda: self._fetch_terms(merchant_id),
            lifetime=lambda _: self._policy.ttl_seconds,
        )

    # --- the cache --------------------------------------------------------------------------

    async def _read(
        self,
        key: Hashable,
        *,
        kind: str,
        fetch: Callable[[], Awaitable[V]],
        lifetime: Callable[[V], float],
        covers: Callable[[V], bool] = lambda _: True,
    ) -> V:
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() < cached.fresh_until and covers(cached.value):
            cache_requests.labels(kind, "hit").inc()
            return cached.value
        try:
            value: V = await self._fetch_once(key, fetch, lifetime)
        except _CatalogCannotAnswer as failure:
            if cached is None:
                cache_requests.labels(kind, "miss").inc()
                raise Unavailable(
                    f"the catalog cannot answer ({failure}) and nothing is cached", reason=CATALOG_UNAVAILABLE
                ) from None
            cache_requests.labels(kind, "stale_served").inc()
            log.warning("catalog cannot answer (%s); serving %s from the cache", failure, kind)
            return cached.value
        cache_requests.labels(kind, "miss").inc()
        return value

    async def _fetch_once(
        self, key: Hashable, fetch: Callable[[], Awaitable[V]], lifetime: Callable[[V], float]
    ) -> V:
        """Fetches and caches the value of `key`; concurrent reads of one key share one fetch."""
        pending = self._in_flight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch_and_store(key, fetch, lifetime))
            self._in_flight[key] = pending
            pending.add_done_callback(lambda done: self._forget(key, done))
        # Shielded: a reader that gives up must not cancel the fetch others wait for.
        return await asyncio.shield(pending)

    def _forget(self, key: Hashable, done: asyncio.Future[Any]) -> None:
        self._in_flight.pop(key, None)
        if not done.cancelled():
            # Retrieved here, so a failure nobody waited for any more is not reported as lost.
            done.exception()

    async def _fetch_and_store(
        self, key: Hashable, fetch: Callable[[], Awaitable[V]], lifetime: Callable[[V], float]
    ) -> V:
        value = await fetch()
        self._cache.put(key, _Entry(value, time.monotonic() + lifetime(value)))
        return value

    # --- the calls --------------------------------------------------------------------------

    async def _fetch_product(self, merchant_id: str, product_id: UUID) -> ProductTemplate:
        response = await _ask(
            self._stub.GetProduct(api.GetProductRequest(merchant_id=merchant_id, product_id=str(product_id)))
        )
        return _product_template(response.product)

    async def _fetch_signup_products(self, merchant_id: str) -> tuple[ProductTemplate, ...]:
        products: list[ProductTemplate] = []
        page_token = ""
        while True:
            response = await _ask(
                self._stub.ListProducts(
                    api.ListProductsRequest(
                        merchant_id=merchant_id,
                        page_size=PAGE_SIZE,
                        page_token=page_token,
                        distribution=res.PRODUCT_DISTRIBUTION_GRANT,
                        grant_policy=res.GRANT_POLICY_APPLY_ON_SIGNUP,
                    )
                )
            )
            products.extend(_product_template(product) for product in response.products)
            page_token = response.next_page_token
            if not page_token:
                return tuple(products)

    async def _fetch_timeline(self, merchant_id: str, operation_code: str) -> _Timeline:
        # Read before the call: every version scheduled after this instant starts after it.
        read_at = self._clock()
        versions: list[_Version] = []
        page_token = ""
        while True:
            response = await _ask(
                self._stub.ListOperationTypeVersions(
                    api.ListOperationTypeVersionsRequest(
                        merchant_id=merchant_id,
                        operation_code=operation_code,
                        page_size=PAGE_SIZE,
                        page_token=page_token,
                    )
                )
            )
            versions.extend(_version(message) for message in response.operation_type_versions)
            page_token = response.next_page_token
            if not page_token:
                break
        if not versions:
            raise _operation_type_not_found(merchant_id, operation_code)
        versions.sort(key=lambda version: version.starts_at)
        return _Timeline(operation_code, tuple(versions), read_at)

    async def _fetch_terms(self, merchant_id: str) -> MerchantTerms:
        response = await _ask(self._stub.GetMerchant(api.GetMerchantRequest(merchant_id=merchant_id)))
        return MerchantTerms(operation_timeout=response.merchant.config.operation_timeout.ToTimedelta())


async def _ask(call: Awaitable[V]) -> V:
    """The catalog's response; its answers about the data as TallyErrors (reasons kept), and
    `_CatalogCannotAnswer` when it gave none."""
    try:
        return await call
    except grpc.aio.AioRpcError as rpc_error:
        error = error_from_rpc(rpc_error)
        if rpc_error.code() in _ANSWER_CODES:
            raise error from None
        if rpc_error.code() in _CREDENTIAL_CODES:
            log.error("the catalog refuses the ledger's credentials: %s (%s)", error.reason, error.message)
        raise _CatalogCannotAnswer(f"{rpc_error.code().name}: {error.reason}") from None
    except Unavailable as open_circuit:
        raise _CatalogCannotAnswer(open_circuit.reason) from None


def _check_merchant_id(merchant_id: str) -> None:
    # The catalog refuses a malformed id as bad input; to the ledger it is a merchant that
    # does not exist.
    if not is_valid_merchant_id(merchant_id):
        raise NotFound(f"merchant {merchant_id!r} does not exist", reason="MERCHANT_NOT_FOUND")


def _operation_type_not_found(merchant_id: str, operation_code: str) -> NotFound:
    return NotFound(
        f"operation type {operation_code} does not exist",
        reason="OPERATION_TYPE_NOT_FOUND",
        metadata={"merchant_id": merchant_id, "operation_code": operation_code},
    )


def _product_template(product: res.Product) -> ProductTemplate:
    try:
        return ProductTemplate(
            product_id=UUID(product.product_id),
            name=product.name,
            credits=parse_credits(product.credits.value),
            access_period_days=product.access_period_days if product.HasField("access_period_days") else None,
            distribution=_DISTRIBUTIONS[product.distribution],
            grant_policy=_GRANT_POLICIES.get(product.grant_policy),
            archived=product.state == res.PRODUCT_STATE_ARCHIVED,
        )
    except (ValueError, KeyError) as malformed:
        raise _contract_broken("product", product.product_id, malformed) from malformed


def _version(message: res.OperationTypeVersion) -> _Version:
    try:
        return _Version(
            rate=OperationRate(
                operation_code=message.operation_code,
                version=message.version,
                resource_unit=message.resource_unit,
                credits_per_unit=parse_credits(message.credits_per_unit.value),
            ),
            starts_at=message.effective_time.ToDatetime(tzinfo=UTC),
            ends_at=message.end_time.ToDatetime(tzinfo=UTC) if message.HasField("end_time") else None,
        )
    except ValueError as malformed:
        raise _contract_broken("operation type version", message.operation_code, malformed) from malformed


def _contract_broken(what: str, name: str, cause: Exception) -> UpstreamError:
    # The catalog validates everything it stores; a value the ledger cannot read means the two
    # builds disagree on the API, which no retry fixes.
    log.error("the catalog sent a %s %s the ledger cannot read: %s", what, name, cause)
    return UpstreamError(
        f"the catalog sent a {what} the ledger cannot read",
        code=grpc.StatusCode.INTERNAL,
        reason="CATALOG_CONTRACT_BROKEN",
    )
