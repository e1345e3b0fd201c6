"""The unit of work against the real PostgreSQL: the effect, its key (recorded after it, with
the response) and its events commit together or not at all; repeats, failing repeats and
concurrent repeats get the first response, and one key has one effect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import StringValue
from tally.common.v1.event_pb2 import EventEnvelope
from tally_kit.db import MerchantDirectory, MigrationSource
from tally_kit.errors import AlreadyExists
from tally_kit.settings import ServiceSettings
from tally_kit.uow import Mutations, Transaction

pytestmark = pytest.mark.integration

MERCHANT = "uow"
OPERATION = "/tally_kit_tests.Grants/Grant"


def _message_types() -> tuple[type[Message], type[Message]]:
    """A request carrying `request_id` and its response, as a service's protos would define them."""
    string = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    file = descriptor_pb2.FileDescriptorProto(
        name="tally_kit_tests/uow.proto", package="tally_kit_tests", syntax="proto3"
    )
    request = file.message_type.add(name="GrantRequest")
    request.field.add(name="request_id", number=1, type=string)
    request.field.add(name="grant_key", number=2, type=string)
    request.field.add(name="credits", number=3, type=string)
    response = file.message_type.add(name="GrantResponse")
    response.field.add(name="grant_id", number=1, type=string)
    response.field.add(name="credits", number=2, type=string)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("tally_kit_tests.GrantRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("tally_kit_tests.GrantResponse")),
    )


GrantRequest, GrantResponse = _message_types()


class RecordingRelay:
    """The relay's notify side: which merchants were announced, in order."""

    def __init__(self) -> None:
        self.notified: list[str] = []

    def notify(self, merchant_id: str) -> None:
        self.notified.append(merchant_id)


@pytest.fixture(scope="module")
async def directory(
    kit_settings: ServiceSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[MerchantDirectory]:
    migrations: Path = tmp_path_factory.mktemp("uow_migrations")
    # A grant key, when given, is used once: a repeat's effect then fails as its work is done.
    (migrations / "0001_grants.sql").write_text(
        "CREATE TABLE grants (id bigserial PRIMARY KEY, request_id text NOT NULL, grant_key text UNIQUE,"
        " credits numeric NOT NULL);"
    )
    settings = kit_settings.model_copy(update={"service_name": "uow", "db_pool_max_size": 5})
    directory = MerchantDirectory(settings, [MigrationSource("grants", migrations)])
    await directory.start()
    await directory.provision(MERCHANT)
    yield directory
    await directory.close()


def _grant_effect(
    request: Message, *, pause: float = 0.0, fail_after_publishing: bool = False
) -> Callable[[Transaction], Awaitable[Message]]:
    async def effect(tx: Transaction) -> Message:
        grant_id = await tx.conn.fetchval(
            "INSERT INTO grants (request_id, grant_key, credits) VALUES ($1, $2, $3::numeric) RETURNING id",
            request.request_id,
            request.grant_key or None,
            request.credits,
        )
        await tx.publish("kit.grant_issued", StringValue(value=f"grant {grant_id}"))
        await tx.publish("kit.grant_counted", StringValue(value=f"count {grant_id}"))
        if pause:
            await asyncio.sleep(pause)
        if fail_after_publishing:
            raise RuntimeError("the effect failed")
        return GrantResponse(grant_id=str(grant_id), credits=request.credits)

    return effect


async def _run(
    directory: MerchantDirectory,
    relay: RecordingRelay,
    request: Message,
    *,
    pause: float = 0.0,
    fail_after_publishing: bool = False,
) -> Message:
    mutations = Mutations(directory, relay, producer="kit")
    return await mutations.run(
        MERCHANT,
        operation=OPERATION,
        request=request,
        response_type=GrantResponse,
        effect=_grant_effect(request, pause=pause, fail_after_publishing=fail_after_publishing),
    )


async def _rows(directory: MerchantDirectory, request_id: str) -> tuple[int, int, list[str]]:
    """(effect rows, keys, outbox event payloads in outbox order) of the request id."""
    async with directory.connection(MERCHANT) as conn:
        effects = await conn.fetchval("SELECT count(*) FROM grants WHERE request_id = $1", request_id)
        keys = await conn.fetchval("SELECT count(*) FROM idempotency_keys WHERE request_id = $1", request_id)
        grant_ids = [
            str(row["id"])
            for row in await conn.fetch("SELECT id FROM grants WHERE request_id = $1", request_id)
        ]
        events = await _events_of(conn, grant_ids)
    return effects, keys, events


async def _events_of(conn: asyncpg.Connection, grant_ids: list[str]) -> list[str]:
    payloads = []
    for row in await conn.fetch("SELECT event_type, envelope FROM outbox ORDER BY id"):
        value = StringValue()
        EventEnvelope.FromString(row["envelope"]).payload.Unpack(value)
        if value.value.rpartition(" ")[2] in grant_ids:
            payloads.append(f"{row['event_type']}: {value.value}")
    return payloads


async def test_the_effect_its_key_and_its_events_commit_together(directory: MerchantDirectory) -> None:
    relay = RecordingRelay()
    request = GrantRequest(request_id="commit-1", credits="2.5")

    response = await _run(directory, relay, request)

    effects, keys, events = await _rows(directory, "commit-1")
    assert (effects, keys) == (1, 1)
    assert events == [
        f"kit.grant_issued: grant {response.grant_id}",
        f"kit.grant_counted: count {response.grant_id}",
    ]
    async with directory.connection(MERCHANT) as conn:
        stored = await conn.fetchrow(
            "SELECT operation, response FROM idempotency_keys WHERE request_id = 'commit-1'"
        )
    assert stored["operation"] == OPERATION
    assert stored["response"] == response.SerializeToString(deterministic=True)
    assert relay.notified == [MERCHANT]


async def test_a_repeat_returns_the_first_response_and_adds_nothing(directory: MerchantDirectory) -> None:
    relay = RecordingRelay()
    request = GrantRequest(request_id="replay-1", credits="1")

    first = await _run(directory, relay, request)
    repeat = await _run(directory, relay, request)

    assert repeat.SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)
    effects, keys, events = await _rows(directory, "replay-1")
    assert (effects, keys, len(events)) == (1, 1, 2)
    assert relay.notified == [MERCHANT]


async def test_a_repeat_whose_effect_now_fails_gets_the_first_response(directory: MerchantDirectory) -> None:
    relay = RecordingRelay()
    request = GrantRequest(request_id="done-1", grant_key="key-done-1", credits="4")

    first = await _run(directory, relay, request)
    # The grant key is taken by the first: the repeat's insert fails, its key answers instead.
    repeat = await _run(directory, relay, request)

    assert repeat == first
    effects, keys, events = await _rows(directory, "done-1")
    assert (effects, keys, len(events)) == (1, 1, 2)


async def test_a_reused_id_with_another_payload_is_refused_whatever_its_effect_does(
    directory: MerchantDirectory,
) -> None:
    relay = RecordingRelay()
    await _run(directory, relay, GrantRequest(request_id="reuse-1", grant_key="key-reuse-1", credits="5"))

    with pytest.raises(AlreadyExists) as effect_succeeded:
        await _run(directory, relay, GrantRequest(request_id="reuse-1", credits="6"))
    with pytest.raises(AlreadyExists) as effect_failed:
        await _run(directory, relay, GrantRequest(request_id="reuse-1", grant_key="key-reuse-1", credits="6"))

    for refused in (effect_succeeded.value, effect_failed.value):
        assert refused.reason == "IDEMPOTENCY_KEY_REUSED"
    effects, keys, events = await _rows(directory, "reuse-1")
    assert (effects, keys, len(events)) == (1, 1, 2)
    assert relay.notified == [MERCHANT]


@pytest.mark.parametrize("grant_key", ["key-race-1", ""], ids=["effects-collide", "effects-independent"])
async def test_concurrent_repeats_have_one_effect_and_one_answer(
    directory: MerchantDirectory, grant_key: str
) -> None:
    relay = RecordingRelay()
    request_id = f"race-{grant_key or 'free'}"
    request = GrantRequest(request_id=request_id, grant_key=grant_key, credits="3")

    responses = await asyncio.gather(*(_run(directory, relay, request, pause=0.02) for _ in range(8)))

    assert len({response.SerializeToString(deterministic=True) for response in responses}) == 1
    effects, keys, events = await _rows(directory, request_id)
    assert (effects, keys, len(events)) == (1, 1, 2)
    assert relay.notified == [MERCHANT]


async def test_a_failing_effect_leaves_no_key_and_no_events(directory: MerchantDirectory) -> None:
    relay = RecordingRelay()
    request = GrantRequest(request_id="fails-1", credits="7")

    with pytest.raises(RuntimeError, match="the effect failed"):
        await _run(directory, relay, request, fail_after_publishing=True)

    assert await _rows(directory, "fails-1") == (0, 0, [])
    assert relay.notified == []
    # The key is free: a retry performs the effect.
    response = await _run(directory, relay, request)
    assert response.credits == "7"
    effects, keys, events = await _rows(directory, "fails-1")
    assert (effects, keys, len(events)) == (1, 1, 2)
