"""Idempotency keys against the real PostgreSQL: replay, reuse refused, one effect under concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from tally_kit import idempotency
from tally_kit.db import MerchantDirectory, MigrationSource
from tally_kit.errors import AlreadyExists, InvalidArgument, Violations
from tally_kit.settings import ServiceSettings

pytestmark = pytest.mark.integration

MERCHANT = "idem"


def _message_types() -> tuple[type[Message], type[Message]]:
    """A request carrying `request_id` and its response, as a service's protos would define them."""
    string = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    file = descriptor_pb2.FileDescriptorProto(
        name="tally_kit_tests/idempotency.proto", package="tally_kit_tests", syntax="proto3"
    )
    request = file.message_type.add(name="GrantCreditsRequest")
    request.field.add(name="request_id", number=1, type=string)
    request.field.add(name="user_id", number=2, type=string)
    request.field.add(name="credits", number=3, type=string)
    response = file.message_type.add(name="Grant")
    response.field.add(name="grant_id", number=1, type=string)
    response.field.add(name="credits", number=2, type=string)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("tally_kit_tests.GrantCreditsRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("tally_kit_tests.Grant")),
    )


GrantCreditsRequest, Grant = _message_types()


@pytest.fixture(scope="module")
async def directory(
    kit_settings: ServiceSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[MerchantDirectory]:
    migrations: Path = tmp_path_factory.mktemp("grant_migrations")
    # No unique constraint on request_id: a second effect would show as a second row.
    (migrations / "0001_grants.sql").write_text(
        "CREATE TABLE grants (id bigserial PRIMARY KEY, request_id text NOT NULL, credits numeric NOT NULL);"
    )
    settings = kit_settings.model_copy(update={"service_name": "idem", "db_pool_max_size": 5})
    directory = MerchantDirectory(settings, [MigrationSource("grants", migrations)])
    await directory.start()
    await directory.provision(MERCHANT)
    yield directory
    await directory.close()


async def _grant(
    directory: MerchantDirectory, request: Message, *, operation: str = "GrantCredits"
) -> Message:
    """A servicer's mutation: the effect and its key in one merchant transaction."""
    async with directory.transaction(MERCHANT) as conn:

        async def effect() -> Message:
            grant_id = await conn.fetchval(
                "INSERT INTO grants (request_id, credits) VALUES ($1, $2::numeric) RETURNING id",
                request.request_id,
                request.credits,
            )
            # Keeps the key's row locked for a while, so concurrent repeats queue behind it.
            await asyncio.sleep(0.05)
            return Grant(grant_id=str(grant_id), credits=request.credits)

        return await idempotency.run_once(
            conn,
            operation=operation,
            request_id=request.request_id,
            request=request,
            response_type=Grant,
            effect=effect,
        )


async def _rows(directory: MerchantDirectory, request_id: str) -> tuple[int, int]:
    """(effect rows, idempotency keys) recorded for the request id."""
    async with directory.connection(MERCHANT) as conn:
        effects = await conn.fetchval("SELECT count(*) FROM grants WHERE request_id = $1", request_id)
        keys = await conn.fetchval("SELECT count(*) FROM idempotency_keys WHERE request_id = $1", request_id)
    return effects, keys


def test_request_ids_are_printable_ascii_without_whitespace() -> None:
    for valid in ("a", "req-2024/07:01_x", "~" * 128):
        violations = Violations()
        idempotency.validate_request_id(violations, valid)
        assert not violations, valid

    cases = {
        "": "request_id: is required",
        "has space": "request_id: must be 1 to 128 printable ASCII characters without whitespace",
        "tab\there": "request_id: must be",
        "é": "request_id: must be",
        "x" * 129: "request_id: must be",
    }
    for value, expected in cases.items():
        violations = Violations()
        idempotency.validate_request_id(violations, value)
        with pytest.raises(InvalidArgument, match=expected):
            violations.raise_if_any()


def test_fingerprint_ignores_the_request_id_only() -> None:
    request = GrantCreditsRequest(request_id="r-1", user_id="u-1", credits="10")
    same_payload = GrantCreditsRequest(request_id="r-2", user_id="u-1", credits="10")
    other_payload = GrantCreditsRequest(request_id="r-1", user_id="u-1", credits="11")

    granted = idempotency.fingerprint("GrantCredits", request)
    assert len(granted) == 64
    assert idempotency.fingerprint("GrantCredits", same_payload) == granted
    assert idempotency.fingerprint("GrantCredits", other_payload) != granted
    assert idempotency.fingerprint("RevokeCredits", request) != granted
    assert request.request_id == "r-1"  # the caller's message is left untouched


async def test_a_repeat_returns_the_first_response_byte_for_byte(directory: MerchantDirectory) -> None:
    first = await _grant(directory, GrantCreditsRequest(request_id="replay-1", user_id="u-1", credits="1.5"))
    repeat = await _grant(directory, GrantCreditsRequest(request_id="replay-1", user_id="u-1", credits="1.5"))

    async with directory.connection(MERCHANT) as conn:
        stored = await conn.fetchval("SELECT response FROM idempotency_keys WHERE request_id = 'replay-1'")
    assert stored == first.SerializeToString(deterministic=True)
    assert repeat.SerializeToString(deterministic=True) == stored
    assert await _rows(directory, "replay-1") == (1, 1)


async def test_a_reused_request_id_with_another_payload_or_operation_is_refused(
    directory: MerchantDirectory,
) -> None:
    await _grant(directory, GrantCreditsRequest(request_id="reuse-1", user_id="u-1", credits="5"))

    with pytest.raises(AlreadyExists) as other_payload:
        await _grant(directory, GrantCreditsRequest(request_id="reuse-1", user_id="u-1", credits="6"))
    with pytest.raises(AlreadyExists) as other_operation:
        await _grant(
            directory,
            GrantCreditsRequest(request_id="reuse-1", user_id="u-1", credits="5"),
            operation="AdjustCredits",
        )

    for refused in (other_payload.value, other_operation.value):
        assert refused.reason == "IDEMPOTENCY_KEY_REUSED"
        assert refused.message == "request_id 'reuse-1' was used for a different request"
    assert await _rows(directory, "reuse-1") == (1, 1)


async def test_concurrent_requests_with_one_id_have_one_effect(directory: MerchantDirectory) -> None:
    responses = await asyncio.gather(
        *(
            _grant(directory, GrantCreditsRequest(request_id="race-1", user_id="u-1", credits="3"))
            for _ in range(20)
        )
    )

    assert len({r.SerializeToString(deterministic=True) for r in responses}) == 1
    assert await _rows(directory, "race-1") == (1, 1)


async def test_an_effect_that_fails_leaves_no_key(directory: MerchantDirectory) -> None:
    request = GrantCreditsRequest(request_id="fails-1", user_id="u-1", credits="7")

    async def failing_effect() -> Message:
        raise RuntimeError("the effect failed")

    with pytest.raises(RuntimeError, match="the effect failed"):
        async with directory.transaction(MERCHANT) as conn:
            await idempotency.run_once(
                conn,
                operation="GrantCredits",
                request_id=request.request_id,
                request=request,
                response_type=Grant,
                effect=failing_effect,
            )
    assert await _rows(directory, "fails-1") == (0, 0)

    # The key is free again: a retry performs the effect.
    response = await _grant(directory, request)
    assert response.credits == "7"
    assert await _rows(directory, "fails-1") == (1, 1)


async def test_begin_refuses_to_run_outside_a_transaction(directory: MerchantDirectory) -> None:
    request = GrantCreditsRequest(request_id="no-tx-1", user_id="u-1", credits="1")
    async with directory.connection(MERCHANT) as conn:
        with pytest.raises(RuntimeError, match="inside the transaction"):
            await idempotency.begin(
                conn, operation="GrantCredits", request_id="no-tx-1", request=request, response_type=Grant
            )
