"""Bad input on every RPC of CatalogService, driven by the table in `tally_catalog.testing.REFUSALS`.

Each case is a valid request with one thing broken, so that without the check it would
succeed: a missing or malformed field is INVALID_ARGUMENT whose `google.rpc.BadRequest`
names that field; a merchant or resource that does not exist is NOT_FOUND with its
`google.rpc.ErrorInfo` reason. After every refusal nothing is half-written: no database,
no placement, no row and no outbox event (checked with SQL).
"""

from __future__ import annotations

import grpc
import pytest
from tally.catalog.v1 import catalog_service_pb2 as api
from tally_catalog.testing import (
    ERROR_DOMAIN,
    MUTATING_RPCS,
    REFUSALS,
    RPC_NAMES,
    BadField,
    Catalog,
    Subjects,
    UnknownTarget,
    broken,
    merchant_config,
    new_id,
    new_merchant_id,
    valid_request,
)

pytestmark = pytest.mark.integration

UNKNOWN_CASES = [(rpc, target) for rpc, cases in REFUSALS.items() for target in cases.unknown]


@pytest.fixture(scope="module")
async def subjects(catalog: Catalog) -> Subjects:
    return await catalog.seed(new_merchant_id("input"))


def test_the_table_covers_every_rpc_of_the_service() -> None:
    assert sorted(REFUSALS) == sorted(RPC_NAMES)
    for rpc, cases in REFUSALS.items():
        assert cases.unknown or cases.no_unknown_because, f"{rpc} has no NOT_FOUND case"


async def test_every_valid_request_of_the_table_succeeds(catalog: Catalog) -> None:
    """The control: what the other tests break is a request that works, and a snapshot sees
    what each mutation writes. On a merchant of its own, since the requests change it."""
    subjects = await catalog.seed(new_merchant_id("valid"))
    failures = {}
    unchanged_by = []
    # Archiving last: the requests after it would meet an archived product.
    for rpc in sorted(RPC_NAMES, key=lambda name: name == "ArchiveProduct"):
        before = await catalog.databases.snapshot(subjects.merchant_id)
        try:
            await catalog.call(rpc, valid_request(rpc, subjects))
        except grpc.aio.AioRpcError as error:
            failures[rpc] = (error.code().name, error.details())
        if rpc in MUTATING_RPCS and await catalog.databases.snapshot(subjects.merchant_id) == before:
            unchanged_by.append(rpc)
    assert failures == {}
    assert unchanged_by == []


async def _assert_invalid_argument(catalog: Catalog, subjects: Subjects, rpc: str, case: BadField) -> None:
    request = broken(valid_request(rpc, subjects), case.breaks)
    before = await catalog.databases.snapshot(subjects.merchant_id)
    refusal = await catalog.refuse(rpc, request)
    assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (refusal.reason, refusal.domain) == ("INVALID_ARGUMENT", ERROR_DOMAIN)
    assert refusal.fields == (case.field,)
    assert case.field in refusal.message
    assert await catalog.databases.snapshot(subjects.merchant_id) == before


@pytest.mark.parametrize("rpc", RPC_NAMES)
async def test_a_missing_field_is_invalid_argument_naming_it(
    catalog: Catalog, subjects: Subjects, rpc: str
) -> None:
    await _assert_invalid_argument(catalog, subjects, rpc, REFUSALS[rpc].missing)


@pytest.mark.parametrize("rpc", RPC_NAMES)
async def test_a_malformed_field_is_invalid_argument_naming_it(
    catalog: Catalog, subjects: Subjects, rpc: str
) -> None:
    await _assert_invalid_argument(catalog, subjects, rpc, REFUSALS[rpc].malformed)


@pytest.mark.parametrize(
    ("rpc", "target"), UNKNOWN_CASES, ids=[f"{rpc}-unknown {target.what}" for rpc, target in UNKNOWN_CASES]
)
async def test_an_unknown_merchant_or_resource_is_not_found(
    catalog: Catalog, subjects: Subjects, rpc: str, target: UnknownTarget
) -> None:
    request = broken(valid_request(rpc, subjects), target.points_elsewhere)
    before = await catalog.databases.snapshot(subjects.merchant_id)
    refusal = await catalog.refuse(rpc, request)
    assert (refusal.code, refusal.reason, refusal.domain) == (
        grpc.StatusCode.NOT_FOUND,
        target.reason,
        ERROR_DOMAIN,
    )
    assert refusal.fields == ()
    # Snapshots include every database and placement: no database for the unknown merchant.
    assert await catalog.databases.snapshot(subjects.merchant_id) == before


async def test_a_refused_create_merchant_creates_no_database(catalog: Catalog) -> None:
    merchant_id = new_merchant_id("refused")
    before = (await catalog.databases.databases(), await catalog.databases.placements())
    refusals = [
        await catalog.refuse(
            "CreateMerchant",
            api.CreateMerchantRequest(merchant_id=merchant_id, request_id=new_id(), config=config),
        )
        for config in (
            merchant_config(default_currency="XYZ"),
            merchant_config(retention_days=0),
            merchant_config(receipt_series_prefix="acme lowercase"),
        )
    ]
    assert [(r.code, r.fields) for r in refusals] == [
        (grpc.StatusCode.INVALID_ARGUMENT, ("config.default_currency",)),
        (grpc.StatusCode.INVALID_ARGUMENT, ("config.retention_days",)),
        (grpc.StatusCode.INVALID_ARGUMENT, ("config.receipt_series_prefix",)),
    ]
    assert catalog.databases.merchant_database(merchant_id) not in await catalog.databases.databases()
    assert (await catalog.databases.databases(), await catalog.databases.placements()) == before
