"""The books under random sequences of calls (a hypothesis state machine), through the servicer
on the real PostgreSQL, with the test's clock.

Three users of one merchant buy products, are granted credits, open, record, cancel and time
out operations (at the rate each pinned when it opened, while the operation type's rate
changes), are refunded, charged back and adjusted, and see their lots expire while time passes
(the expiry and timeout jobs run on the same clock). A model kept here (each user's lots, debt
and the entries they should have) says what every call must answer, or refuse, and write.
After every step, for each user, through the service's own read API:

- GetBalance's balance is the sum of the whole GetLedgerHistory (read page by page), and the
  history is exactly the entries the model expects, in the order written, at their instants;
- every lot of ListLots (read page by page) holds remaining credits within [0, credits], as
  many as the model says, in the state it says;
- GetBalance lists the usable lots in FIFO order: soonest expiry first, never-expiring last,
  ties by issue time (then lot id, the service's total order); each debit's entries (in the
  call's answer) take from those lots in that order, and only beyond them write debt.

Replaying an earlier request with its request_id returns the first answer and changes no row
of the merchant's database; settling an order or applying a grant key again under a new
request_id returns the same lot. GetBalance as of every past instant a step ran at (and of
halfway to the next) equals the sum of the entries written up to it, and what the model had
then.

Hypothesis runs the machine in a worker thread (its rules are synchronous); every call runs on
the session's event loop, where the directory's pools live.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from ledger_harness import (
    OPERATION_CODE,
    T0,
    Client,
    Clock,
    MemoryCatalog,
    RecordingRelay,
    credits,
    instant,
    new_id,
    new_user,
    snapshot,
    timestamp,
)
from tally.ledger.v1 import ledger_service_pb2 as api
from tally.ledger.v1 import resources_pb2 as res
from tally_kit.db.directory import MerchantDirectory
from tally_kit.errors import FailedPrecondition, TallyError
from tally_kit.uow import Mutations
from tally_ledger.catalog import Distribution, GrantPolicy
from tally_ledger.jobs import LedgerJobs
from tally_ledger.servicer import LedgerServicer
from tally_ledger.services import Ledger

# The jobs' merchant filter lives with the job tests' helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs"))

from ledger_support import OnlyMerchants

pytestmark = pytest.mark.integration

T = TypeVar("T")

# Bounded so the run stays well under two minutes on a loaded 2-core machine.
MAX_EXAMPLES = 20
STEPS_PER_EXAMPLE = 50
CALL_TIMEOUT_SECONDS = 60.0

USERS = 3
PAID_MINOR = 990
ZERO = Decimal(0)
QUANTUM = Decimal("0.000001")
NEVER = datetime.max.replace(tzinfo=UTC)
DAY = timedelta(days=1)
# Small pages, so that reading a user's lots and history soon walks several pages.
LOTS_PAGE = 6
HISTORY_PAGE = 20

# Credits per unit of the operation type: each example starts with the first.
RATES = ("0.002", "0.0045", "0.0005")
# Sellable products (credits, access days) and the sign-up grant every user receives.
PRODUCTS = (("10", 1), ("2.5", 2), ("40", None), ("0.75", 1))
SIGNUP = ("5", 2)

# Whole days and hours, so that lots often tie on expiry, and on issue time too.
CLOCK_STEPS = (
    timedelta(minutes=1),
    # The merchant's operation timeout: an operation opened that long ago is due.
    timedelta(minutes=15),
    timedelta(minutes=20),
    timedelta(hours=1),
    timedelta(hours=5),
    timedelta(days=1),
    timedelta(days=2),
)
# A grant expires never, some time after its issue, at the end of the day, or when a lot the
# user already holds expires: lots issued at different instants then tie on expiry, and
# their issue times decide.
GRANT_EXPIRIES = (None, timedelta(hours=1), timedelta(days=2), "end of day", "with another lot")
GRANT_SOURCES = (
    res.LOT_SOURCE_PROMOTION,
    res.LOT_SOURCE_GRANT,
    res.LOT_SOURCE_CASHBACK,
    res.LOT_SOURCE_SUBSCRIPTION,
)


def _millionths(low: int, high: int) -> st.SearchStrategy[Decimal]:
    return st.integers(low, high).map(lambda n: Decimal(n).scaleb(-6))


users = st.integers(0, USERS - 1)
products = st.integers(0, len(PRODUCTS) - 1)
grant_amounts = _millionths(1, 10_000_000)
# Resource amounts whose cost at 0.002 credits a unit spans nothing, sub-millionth usage
# (charged one millionth), ties rounded half to even, and debits past any balance.
resources = st.one_of(
    st.just(ZERO),
    _millionths(1, 600),
    st.integers(1, 50).map(lambda n: Decimal(n) * Decimal("0.00025")),
    _millionths(1, 20_000_000_000),
)
adjustments = _millionths(-20_000_000, 20_000_000).filter(bool)
picks = st.integers(0, 10_000)


def text(value: Decimal) -> str:
    """Credits and resource amounts as the API reads them: plain notation, never an exponent."""
    return format(value, "f")


def cost(resource: Decimal, rate: Decimal) -> Decimal:
    """The API's rounding rule, restated: half to even to a millionth, and a positive usage
    never below one millionth."""
    exact = resource * rate
    charged = exact.quantize(QUANTUM, rounding=ROUND_HALF_EVEN)
    return QUANTUM if exact > 0 and charged == 0 else charged


# (entry kind, lot id or "" for the debt, signed amount, instant written)
Row = tuple[int, str, Decimal, datetime]


def rows(entries: Any) -> list[Row]:
    return [(e.kind, e.lot_id, credits(e.amount), instant(e.create_time)) for e in entries]


@dataclass
class ModelLot:
    lot_id: str
    source: res.LotSource.ValueType
    credits: Decimal
    issued_at: datetime
    expires_at: datetime | None
    remaining: Decimal = ZERO
    # What the user had the use of (debits, debt settled, adjustments, chargeback paybacks).
    consumed: Decimal = ZERO
    order_id: str | None = None
    refunded_minor: int = 0
    # LOT_STATE_REFUNDED or LOT_STATE_CHARGED_BACK once reversed.
    reversal: res.LotState.ValueType | None = None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def usable(self, now: datetime) -> bool:
        return self.remaining > 0 and not self.expired(now)

    def fifo_key(self) -> tuple[datetime, datetime, UUID]:
        """Rule 4: soonest expiry first, never-expiring last, ties by issue time, then id."""
        return (self.expires_at or NEVER, self.issued_at, UUID(self.lot_id))

    def state(self, now: datetime) -> res.LotState.ValueType:
        if self.reversal is not None:
            return self.reversal
        if self.expired(now):
            return res.LOT_STATE_EXPIRED
        return res.LOT_STATE_DEPLETED if self.remaining == 0 else res.LOT_STATE_ACTIVE


@dataclass
class ModelOperation:
    operation_id: str
    opened_at: datetime
    # The operation type's credits per unit when it opened, pinned (rule 5).
    rate: Decimal
    state: res.OperationState.ValueType = res.OPERATION_STATE_OPEN


@dataclass
class ModelUser:
    """One user's books as the rules say they must be."""

    user_id: str
    lots: dict[str, ModelLot] = field(default_factory=dict)
    debt: Decimal = ZERO
    entries: list[Row] = field(default_factory=list)
    operations: list[ModelOperation] = field(default_factory=list)
    # (instant, balance, debt) after every step.
    history: list[tuple[datetime, Decimal, Decimal]] = field(default_factory=list)

    @property
    def balance(self) -> Decimal:
        return sum((lot.remaining for lot in self.lots.values()), ZERO) - self.debt

    @property
    def open_operation(self) -> ModelOperation | None:
        last = self.operations[-1] if self.operations else None
        return last if last is not None and last.state == res.OPERATION_STATE_OPEN else None

    def usable(self, now: datetime) -> list[ModelLot]:
        return sorted((lot for lot in self.lots.values() if lot.usable(now)), key=ModelLot.fifo_key)

    def post(self, kind: int, amount: Decimal, lot: ModelLot | None, now: datetime) -> Row:
        row = (kind, lot.lot_id if lot else "", amount, now)
        self.entries.append(row)
        if lot is None:
            self.debt -= amount
        else:
            lot.remaining += amount
        return row

    def issue(self, lot: ModelLot, kind: int, now: datetime) -> list[Row]:
        """Rule 6: issued at full value, then settling the debt with a balanced pair."""
        self.lots[lot.lot_id] = lot
        written = [self.post(kind, lot.credits, lot, now)]
        settled = min(self.debt, lot.credits)
        if settled > 0:
            written.append(self.post(res.ENTRY_KIND_DEBT_SETTLEMENT, -settled, lot, now))
            lot.consumed += settled
            written.append(self.post(res.ENTRY_KIND_DEBT_SETTLEMENT, settled, None, now))
        return written

    def take(self, kind: int, amount: Decimal, now: datetime) -> list[Row]:
        """Rules 4 and 5: from the usable lots in FIFO order, the rest as debt."""
        written: list[Row] = []
        for lot in self.usable(now):
            if amount == 0:
                break
            taken = min(amount, lot.remaining)
            written.append(self.post(kind, -taken, lot, now))
            lot.consumed += taken
            amount -= taken
        if amount > 0:
            written.append(self.post(kind, -amount, None, now))
        return written

    def expire(self, now: datetime) -> None:
        """Rule 8: the credits left in lots past their expiry, soonest first."""
        due = [lot for lot in self.lots.values() if lot.remaining > 0 and lot.expired(now)]
        for lot in sorted(due, key=ModelLot.fifo_key):
            self.post(res.ENTRY_KIND_EXPIRY, -lot.remaining, lot, now)

    def as_of(self, moment: datetime) -> tuple[Decimal, Decimal]:
        """(balance, debt) after the last step at or before `moment`."""
        return next(((b, d) for at, b, d in reversed(self.history) if at <= moment), (ZERO, ZERO))


@dataclass
class Applied:
    """A request the service accepted, and its answer."""

    method: str
    request: Message
    response: Message


class ExampleIds:
    """The ledger's ids (lots, entries, operations): unique to each example, and the same
    from one run of an example to the next. Ties in FIFO order fall to the lot id, so a
    failing example found by hypothesis must meet the same ids when it is run again; the
    sequence is scrambled so that ids do not follow issue order (ties by issue time are
    then told from ties by id)."""

    def __init__(self) -> None:
        self._prefix = 0
        self._count = 0

    def start_example(self) -> None:
        self._prefix = secrets.randbits(64)
        self._count = 0

    def __call__(self) -> UUID:
        self._count += 1
        # Multiplying by an odd constant is a bijection modulo 2**64: no two counts collide.
        return UUID(int=(self._prefix << 64) | (self._count * 0x9E3779B97F4A7C15) % 2**64)


@dataclass
class World:
    """What every example shares: the servicer, the jobs, the catalog, the clock and ids."""

    loop: asyncio.AbstractEventLoop
    ids: ExampleIds
    servicer: LedgerServicer
    directory: MerchantDirectory
    jobs: LedgerJobs
    client: Client
    clock: Clock
    merchant_id: str
    catalog: MemoryCatalog
    products: list[UUID]
    operation_timeout: timedelta


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world
        # Every example starts at the start of a day of the test's calendar (which starts at
        # T0) with ids of its own, so that it runs the same each time hypothesis runs it.
        world.clock.advance(DAY - (world.clock.now - T0) % DAY)
        world.ids.start_example()
        # The operation type's rate, as each example starts (earlier examples changed it).
        self.rate = Decimal(RATES[0])
        world.catalog.schedule_rate(world.merchant_id, OPERATION_CODE, RATES[0], self.now)
        self.client = world.client
        self.users: list[ModelUser] = []
        self.applied: list[Applied] = []
        # Settlements and grants, to repeat under a new request_id.
        self.issued: list[Applied] = []
        # (user index, lot id) of every settled order.
        self.orders: list[tuple[int, str]] = []
        signup_credits, signup_days = Decimal(SIGNUP[0]), timedelta(days=SIGNUP[1])
        for _ in range(USERS):
            user = ModelUser(new_user("stateful"))
            request = api.RegisterUserRequest(
                merchant_id=world.merchant_id, request_id=new_id(), user_id=user.user_id
            )
            response = self.call("RegisterUser", request)
            (signup,) = response.signup_lots
            now = self.now
            lot = ModelLot(signup.lot_id, res.LOT_SOURCE_GRANT, signup_credits, now, now + signup_days)
            assert (credits(signup.credits), instant(signup.expire_time)) == (lot.credits, lot.expires_at)
            user.issue(lot, res.ENTRY_KIND_LOT_ISSUED, now)
            self.users.append(user)

    # --- calling the service --------------------------------------------------------------

    @property
    def now(self) -> datetime:
        return self.world.clock.now

    def run(self, call: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(call, self.world.loop).result(CALL_TIMEOUT_SECONDS)

    def call(self, method: str, request: Message) -> Any:
        response = self.run(getattr(self.world.servicer, method)(request, None))
        self.applied.append(Applied(method, request, response))
        return response

    def refusal(self, method: str, request: Message) -> TallyError:
        try:
            response = self.run(getattr(self.world.servicer, method)(request, None))
        except TallyError as refused:
            return refused
        raise AssertionError(f"{method} was expected to be refused, answered {response}")

    def refused_with(self, method: str, request: Message, reason: str) -> TallyError:
        refused = self.refusal(method, request)
        assert isinstance(refused, FailedPrecondition) and refused.reason == reason, refused
        return refused

    def check_account(self, account: res.Account, user: ModelUser) -> None:
        assert account.user_id == user.user_id
        assert (credits(account.balance), credits(account.debt)) == (user.balance, user.debt)

    # --- lots -----------------------------------------------------------------------------

    @initialize(bought=st.lists(products, min_size=USERS, max_size=USERS))
    def first_purchases(self, bought: list[int]) -> None:
        """Every user starts with a purchase, so that refunds and chargebacks have orders."""
        for who, product in enumerate(bought):
            self.settle_purchase(who, product)

    @rule(who=users, product=products)
    def settle_purchase(self, who: int, product: int) -> None:
        user = self.users[who]
        request = self.client.settle_request(user.user_id, self.world.products[product], paid=PAID_MINOR)
        response = self.call("SettlePurchase", request)
        amount, days = PRODUCTS[product]
        now = self.now
        expires_at = None if days is None else now + timedelta(days=days)
        lot = response.lot
        assert (lot.source, credits(lot.credits), instant(lot.issue_time)) == (
            res.LOT_SOURCE_PURCHASE,
            Decimal(amount),
            now,
        )
        assert (instant(lot.expire_time) if lot.HasField("expire_time") else None) == expires_at
        model = ModelLot(lot.lot_id, lot.source, Decimal(amount), now, expires_at, order_id=request.order_id)
        user.issue(model, res.ENTRY_KIND_LOT_ISSUED, now)
        assert credits(lot.remaining) == model.remaining
        self.check_account(response.account, user)
        self.orders.append((who, lot.lot_id))
        self.issued.append(self.applied[-1])

    @rule(
        who=users,
        amount=grant_amounts,
        expiry=st.sampled_from(GRANT_EXPIRIES),
        source=st.sampled_from(GRANT_SOURCES),
    )
    def grant_credits(self, who: int, amount: Decimal, expiry: timedelta | str | None, source: int) -> None:
        user = self.users[who]
        now = self.now
        expires_at = self.expiry_of_grant(user, expiry)
        request = self.client.grant_request(user.user_id, text(amount), expires_at=expires_at, source=source)
        response = self.call("GrantCredits", request)
        lot = response.lot
        assert (lot.source, credits(lot.credits), instant(lot.issue_time)) == (source, amount, now)
        model = ModelLot(lot.lot_id, source, amount, now, expires_at)
        user.issue(model, res.ENTRY_KIND_LOT_ISSUED, now)
        self.check_account(response.account, user)
        self.issued.append(self.applied[-1])

    def expiry_of_grant(self, user: ModelUser, expiry: timedelta | str | None) -> datetime | None:
        now = self.now
        if expiry is None or isinstance(expiry, timedelta):
            return None if expiry is None else now + expiry
        if expiry == "with another lot":
            # The expiry of the latest-issued lot of the user that is still to expire.
            later = [lot for lot in user.lots.values() if lot.expires_at is not None and lot.expires_at > now]
            if later:
                return max(later, key=lambda lot: lot.issued_at).expires_at
        # The end of the day of the test's calendar, which starts at T0.
        return T0 + (now - T0) // DAY * DAY + DAY

    @precondition(lambda self: self.issued)
    @rule(pick=picks)
    def repeat_order_or_grant_key(self, pick: int) -> None:
        """Rules 7 and 9: an order settles once, a grant key applies once, whatever the request_id."""
        first = self.issued[pick % len(self.issued)]
        again = type(first.request)()
        again.CopyFrom(first.request)
        again.request_id = new_id()  # type: ignore[attr-defined]
        response = self.call(first.method, again)
        assert response.lot.lot_id == first.response.lot.lot_id  # type: ignore[attr-defined]
        user = next(u for u in self.users if response.lot.lot_id in u.lots)
        assert credits(response.lot.remaining) == user.lots[response.lot.lot_id].remaining
        self.check_account(response.account, user)

    # --- operations -----------------------------------------------------------------------

    def with_operations(self, who: int) -> ModelUser:
        """One of the users who opened an operation; their last one is recorded or canceled
        (refused once it is no longer open)."""
        candidates = [user for user in self.users if user.operations]
        return candidates[who % len(candidates)]

    def open(self, user: ModelUser) -> None:
        """Rule 5: opens unless the user owes debt or has an operation open."""
        request = self.client.open_request(user.user_id)
        already_open = user.open_operation
        if user.debt > 0:
            self.refused_with("OpenOperation", request, "NEGATIVE_BALANCE")
        elif already_open is not None:
            refused = self.refused_with("OpenOperation", request, "OPERATION_ALREADY_OPEN")
            assert refused.metadata["operation_id"] == already_open.operation_id
        else:
            operation = self.call("OpenOperation", request).operation
            assert operation.state == res.OPERATION_STATE_OPEN and instant(operation.open_time) == self.now
            assert credits(operation.credits_per_unit) == self.rate
            user.operations.append(ModelOperation(operation.operation_id, self.now, self.rate))

    def record(self, user: ModelUser, resource: Decimal) -> None:
        """Rule 5: the user's last operation recorded, its credits debited FIFO at once;
        refused once it is no longer open."""
        operation = user.operations[-1]
        request = self.client.close_request(operation.operation_id, text(resource))
        if operation.state != res.OPERATION_STATE_OPEN:
            self.refused_with("RecordAndCloseOperation", request, "OPERATION_NOT_OPEN")
            return
        response = self.call("RecordAndCloseOperation", request)
        charged = cost(resource, operation.rate)
        assert response.operation.state == res.OPERATION_STATE_CLOSED
        assert credits(response.operation.credits) == charged
        expected = user.take(res.ENTRY_KIND_DEBIT, charged, self.now) if charged else []
        assert rows(response.entries) == expected, "the debit did not take FIFO"
        operation.state = res.OPERATION_STATE_CLOSED
        self.check_account(response.account, user)

    @rule(who=users)
    def open_operation(self, who: int) -> None:
        self.open(self.users[who])

    @precondition(lambda self: any(user.operations for user in self.users))
    @rule(who=users, resource=resources)
    def record_and_close(self, who: int, resource: Decimal) -> None:
        self.record(self.with_operations(who), resource)

    @rule(rate=st.sampled_from(RATES))
    def change_rate(self, rate: str) -> None:
        """A new version of the operation type from now on: operations open already keep the
        rate they pinned."""
        self.world.catalog.schedule_rate(self.world.merchant_id, OPERATION_CODE, rate, self.now)
        self.rate = Decimal(rate)

    @rule(who=users, usage=st.lists(resources, min_size=1, max_size=3))
    def consume(self, who: int, usage: list[Decimal]) -> None:
        """Operations opened and recorded one after the other, as most callers run them."""
        user = self.users[who]
        for resource in usage:
            self.open(user)
            if user.open_operation is not None:
                self.record(user, resource)

    @precondition(lambda self: any(user.operations for user in self.users))
    @rule(who=users)
    def cancel_operation(self, who: int) -> None:
        user = self.with_operations(who)
        operation = user.operations[-1]
        request = self.client.cancel_request(operation.operation_id)
        if operation.state != res.OPERATION_STATE_OPEN:
            self.refused_with("CancelOperation", request, "OPERATION_NOT_OPEN")
            return
        response = self.call("CancelOperation", request)
        assert response.operation.state == res.OPERATION_STATE_CANCELED
        operation.state = res.OPERATION_STATE_CANCELED

    # --- refunds, chargebacks, adjustments, expiry, time ----------------------------------

    @precondition(lambda self: self.orders)
    @rule(pick=picks, amount=st.sampled_from([1, 400, PAID_MINOR]))
    def refund(self, pick: int, amount: int) -> None:
        who, lot_id = self.orders[pick % len(self.orders)]
        user = self.users[who]
        lot = user.lots[lot_id]
        assert lot.order_id is not None
        request = self.client.refund_request(lot.order_id, amount)
        if lot.reversal == res.LOT_STATE_CHARGED_BACK:
            self.refused_with("ApplyRefund", request, "ORDER_CHARGED_BACK")
            return
        if lot.refunded_minor + amount > PAID_MINOR:
            self.refused_with("ApplyRefund", request, "REFUND_EXCEEDS_PAYMENT")
            return
        response = self.call("ApplyRefund", request)
        revoked = lot.remaining
        expected = user.post(res.ENTRY_KIND_REFUND_REVOCATION, -revoked, lot, self.now) if revoked else None
        assert rows(response.entries) == ([expected] if expected else [])
        assert credits(response.credits_revoked) == revoked
        lot.refunded_minor += amount
        lot.reversal = lot.reversal or res.LOT_STATE_REFUNDED
        assert response.lot.state == res.LOT_STATE_REFUNDED
        self.check_account(response.account, user)

    @precondition(lambda self: self.orders)
    @rule(pick=picks, used=st.booleans())
    def chargeback(self, pick: int, used: bool) -> None:
        """`used`: an order whose credits were partly used, when there is one (the chargeback
        then takes them back from the other lots, or as debt)."""
        used_orders = [
            (who, lot_id)
            for who, lot_id in self.orders
            if self.users[who].lots[lot_id].consumed > 0
            and self.users[who].lots[lot_id].reversal != res.LOT_STATE_CHARGED_BACK
        ]
        orders = used_orders if used and used_orders else self.orders
        who, lot_id = orders[pick % len(orders)]
        user = self.users[who]
        lot = user.lots[lot_id]
        assert lot.order_id is not None
        request = self.client.chargeback_request(lot.order_id, PAID_MINOR)
        if lot.reversal == res.LOT_STATE_CHARGED_BACK:
            self.refused_with("ApplyChargeback", request, "ORDER_ALREADY_CHARGED_BACK")
            return
        response = self.call("ApplyChargeback", request)
        # Rule 7: the lot's full value, its credits left first, then what was consumed of it.
        own, consumed = lot.remaining, lot.consumed
        expected: list[Row] = []
        if own:
            expected.append(user.post(res.ENTRY_KIND_CHARGEBACK_REVOCATION, -own, lot, self.now))
        if consumed:
            expected += user.take(res.ENTRY_KIND_CHARGEBACK_REVOCATION, consumed, self.now)
        assert rows(response.entries) == expected, "the chargeback did not take FIFO"
        assert credits(response.credits_revoked) == own + consumed
        lot.reversal = res.LOT_STATE_CHARGED_BACK
        assert response.lot.state == res.LOT_STATE_CHARGED_BACK
        self.check_account(response.account, user)

    @rule(who=users, amount=adjustments)
    def adjust(self, who: int, amount: Decimal) -> None:
        user = self.users[who]
        response = self.call("ApplyAdjustment", self.client.adjust_request(user.user_id, text(amount)))
        now = self.now
        if amount > 0:
            assert response.HasField("lot") and not response.lot.HasField("expire_time")
            lot = ModelLot(response.lot.lot_id, res.LOT_SOURCE_ADJUSTMENT, amount, now, None)
            expected = user.issue(lot, res.ENTRY_KIND_ADJUSTMENT, now)
        else:
            assert not response.HasField("lot")
            expected = user.take(res.ENTRY_KIND_ADJUSTMENT, -amount, now)
        assert rows(response.entries) == expected, "the adjustment did not take FIFO"
        self.check_account(response.account, user)

    @rule()
    def run_jobs(self) -> None:
        """The expiry job (rule 8), then the job closing operations open past the merchant's
        timeout (rule 5), each over the whole merchant."""
        self.jobs()

    @rule(step=st.sampled_from(CLOCK_STEPS), then_jobs=st.booleans())
    def pass_time(self, step: timedelta, then_jobs: bool) -> None:
        """Time passes, and the jobs run then, as they do periodically, or not yet."""
        self.world.clock.advance(step)
        if then_jobs:
            self.jobs()

    def jobs(self) -> None:
        for job in (self.world.jobs.expiry, self.world.jobs.timeouts):
            run = self.run(job.run_once())
            assert (run.failures, run.merchant_failures) == (0, 0)
        now = self.now
        for user in self.users:
            user.expire(now)
            operation = user.open_operation
            if operation is not None and operation.opened_at + self.world.operation_timeout <= now:
                operation.state = res.OPERATION_STATE_TIMED_OUT

    # --- idempotency and reading the past -------------------------------------------------

    @precondition(lambda self: self.applied)
    @rule(pick=picks)
    def replay(self, pick: int) -> None:
        """The same request_id again: the first answer, and no row of the books moves."""
        first = self.applied[pick % len(self.applied)]
        before = self.run(snapshot(self.world.directory, self.world.merchant_id))
        answer = self.run(getattr(self.world.servicer, first.method)(first.request, None))
        assert answer == first.response
        assert self.run(snapshot(self.world.directory, self.world.merchant_id)) == before

    def check_as_of(self, user: ModelUser, moment: datetime, history: list[res.LedgerEntry]) -> None:
        request = api.GetBalanceRequest(
            merchant_id=self.world.merchant_id, user_id=user.user_id, read_time=timestamp(moment)
        )
        balance = self.run(self.world.servicer.GetBalance(request, None)).balance
        written = sum((credits(e.amount) for e in history if instant(e.create_time) <= moment), ZERO)
        assert credits(balance.balance) == written, f"as of {moment}"
        assert (credits(balance.balance), credits(balance.debt)) == user.as_of(moment), f"as of {moment}"

    # --- the invariants, through the read API ---------------------------------------------

    def read_history(self, user: ModelUser) -> list[res.LedgerEntry]:
        request = api.GetLedgerHistoryRequest(
            merchant_id=self.world.merchant_id, user_id=user.user_id, page_size=HISTORY_PAGE
        )
        entries: list[res.LedgerEntry] = []
        while True:
            page = self.run(self.world.servicer.GetLedgerHistory(request, None))
            entries.extend(page.entries)
            if not page.next_page_token:
                return entries
            request.page_token = page.next_page_token

    def read_lots(self, user: ModelUser) -> list[res.Lot]:
        request = api.ListLotsRequest(
            merchant_id=self.world.merchant_id, user_id=user.user_id, page_size=LOTS_PAGE
        )
        lots: list[res.Lot] = []
        while True:
            page = self.run(self.world.servicer.ListLots(request, None))
            lots.extend(page.lots)
            if not page.next_page_token:
                return lots
            request.page_token = page.next_page_token

    @invariant()
    def books_agree_with_the_model(self) -> None:
        now = self.now
        for user in self.users:
            history = self.read_history(user)
            request = api.GetBalanceRequest(merchant_id=self.world.merchant_id, user_id=user.user_id)
            balance = self.run(self.world.servicer.GetBalance(request, None)).balance
            # Rule 2, then every entry as the model wrote it.
            assert credits(balance.balance) == sum((credits(e.amount) for e in history), ZERO)
            assert rows(history) == user.entries
            assert (credits(balance.balance), credits(balance.debt)) == (user.balance, user.debt)
            awaiting = sum((lot.remaining for lot in user.lots.values() if lot.expired(now)), ZERO)
            assert credits(balance.awaiting_expiry) == awaiting
            # Rule 4: the usable lots in the order the next debit will take them.
            assert [(held.lot_id, credits(held.remaining)) for held in balance.lots] == [
                (lot.lot_id, lot.remaining) for lot in user.usable(now)
            ]
            lots = self.read_lots(user)
            assert sorted(lot.lot_id for lot in lots) == sorted(user.lots)
            for lot in lots:
                model = user.lots[lot.lot_id]
                assert ZERO <= credits(lot.remaining) <= credits(lot.credits) == model.credits
                assert (credits(lot.remaining), lot.state) == (model.remaining, model.state(now)), lot
            if user.operations:
                last = user.operations[-1]
                operation = self.run(
                    self.world.servicer.GetOperation(
                        api.GetOperationRequest(
                            merchant_id=self.world.merchant_id, operation_id=last.operation_id
                        ),
                        None,
                    )
                ).operation
                assert operation.state == last.state
            # Each step's instant and what it left, for the readings of the past.
            user.history.append((now, user.balance, user.debt))

    def teardown(self) -> None:
        """GetBalance as of every past instant a step ran at, and as of halfway to the next
        one, for every user. Only instants before now: nothing can be written at them any
        more, and what the model said of them was checked then (the current instant's may be
        a failed step's)."""
        now = self.now
        for user in self.users:
            history = self.read_history(user)
            moments = sorted({at for at, _, _ in user.history if at < now})
            for index, moment in enumerate(moments):
                following = moments[index + 1] if index + 1 < len(moments) else now
                self.check_as_of(user, moment, history)
                self.check_as_of(user, moment + (following - moment) / 2, history)


# Finding the examples takes well under a minute; the time above pytest's default lets
# hypothesis shrink a failing one (for up to 300 s) and report it.
@pytest.mark.timeout(480)
async def test_the_books_stay_exact_under_random_sequences_of_calls(
    mutations: Mutations,
    directory: MerchantDirectory,
    catalog: MemoryCatalog,
    relay: RecordingRelay,
    clock: Clock,
    merchant_id: str,
) -> None:
    products = [catalog.add_product(merchant_id, amount, days=days).product_id for amount, days in PRODUCTS]
    catalog.add_product(
        merchant_id,
        SIGNUP[0],
        days=SIGNUP[1],
        distribution=Distribution.GRANT,
        policy=GrantPolicy.APPLY_ON_SIGNUP,
    )
    ids = ExampleIds()
    ledger = Ledger(catalog, clock=clock, new_id=ids)
    servicer = LedgerServicer(directory, mutations, catalog, clock=clock, ledger=ledger)
    world = World(
        loop=asyncio.get_running_loop(),
        ids=ids,
        servicer=servicer,
        directory=directory,
        # The jobs also walk the users of earlier examples, so they draw ids of their own
        # (an expiry writes entries, whose ids order nothing).
        jobs=LedgerJobs(
            OnlyMerchants(directory, [merchant_id]),
            Ledger(catalog, clock=clock),
            catalog,
            relay,
            expiry_interval_seconds=60,
            timeout_interval_seconds=60,
            clock=clock,
        ),
        client=Client(servicer, merchant_id, clock),
        clock=clock,
        merchant_id=merchant_id,
        products=products,
        catalog=catalog,
        operation_timeout=(await catalog.merchant_terms(merchant_id)).operation_timeout,
    )
    await asyncio.to_thread(
        run_state_machine_as_test,
        lambda: LedgerMachine(world),
        settings=settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=STEPS_PER_EXAMPLE,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
