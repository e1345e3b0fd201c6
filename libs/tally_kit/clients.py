"""Channels to other Tally services, with the conventions every outgoing call follows.

`open_channel(...)` returns a grpc.aio channel whose unary calls:
- get a deadline when the caller gave none;
- carry the current call's `x-request-id` and bearer token (from `tally_kit.context`), or
  the service's own token when there is no caller to forward;
- are retried with exponential backoff and jitter on UNAVAILABLE, within the deadline and
  only for methods the caller marks safe to repeat (reads, and mutations carrying a
  `request_id`);
- go through a circuit breaker per channel, which opens after consecutive UNAVAILABLE or
  DEADLINE_EXCEEDED answers and then fails calls fast with `Unavailable(reason="CIRCUIT_OPEN")`;
- are counted in the `grpc_client_*` metrics, one count per attempt.
Server-streaming calls get the deadline and the forwarded metadata only.

A callee's error comes back as `grpc.aio.AioRpcError`; `tally_kit.status.error_from_rpc`
turns it into the matching `TallyError`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import grpc
import pybreaker
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from tally_kit import context, metrics
from tally_kit.errors import Unavailable
from tally_kit.interceptors import AUTHORIZATION_KEY, REQUEST_ID_KEY

# Codes that say the callee is down or drowning, as opposed to answering.
_OUTAGE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

_CHANNEL_OPTIONS = (
    # Reconnect soon after a callee restarts, so that retries find it again within their deadline.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5000),
)

TokenSource = Callable[[], str]
UnaryContinuation = Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[grpc.aio.UnaryUnaryCall]]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a safe call is repeated on UNAVAILABLE."""

    max_attempts: int = 4
    initial_backoff_seconds: float = 0.1
    max_backoff_seconds: float = 2.0


@dataclass(frozen=True)
class BreakerPolicy:
    """When the circuit opens (consecutive outage answers) and how long it stays open."""

    failure_threshold: int = 5
    reset_timeout_seconds: float = 30.0


def open_channel(
    target: str,
    *,
    name: str,
    timeout_seconds: float = 5.0,
    safe_methods: Collection[str] = (),
    service_token: TokenSource | None = None,
    retry: RetryPolicy = RetryPolicy(),
    breaker: BreakerPolicy = BreakerPolicy(),
) -> grpc.aio.Channel:
    """A channel to `target` (`host:port`); `name` (e.g. "catalog") names it in errors.

    `safe_methods` are the short names (e.g. "GetProduct") of the RPCs that may be retried.
    `service_token` supplies this service's own token for calls made outside any incoming call.
    """
    policy = _CallPolicy(
        name=name,
        timeout_seconds=timeout_seconds,
        safe_methods=frozenset(safe_methods),
        service_token=service_token,
        retry=retry,
        breaker=pybreaker.CircuitBreaker(
            fail_max=breaker.failure_threshold,
            reset_timeout=breaker.reset_timeout_seconds,
            # Only outages count against the callee; any other outcome (an answer such as
            # NOT_FOUND, or the caller cancelling) counts as a success.
            exclude=[lambda exc: not _is_outage(exc)],
            name=name,
            # The call that trips the circuit still raises its own error.
            throw_new_error_on_trip=False,
        ),
    )
    return grpc.aio.insecure_channel(
        target,
        options=_CHANNEL_OPTIONS,
        interceptors=[_UnaryUnaryInterceptor(policy), _UnaryStreamInterceptor(policy)],
    )


@dataclass(frozen=True)
class _CallPolicy:
    name: str
    timeout_seconds: float
    safe_methods: frozenset[str]
    service_token: TokenSource | None
    retry: RetryPolicy
    breaker: pybreaker.CircuitBreaker

    def prepare(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        """The call with its deadline and forwarded metadata, unless the caller set them."""
        metadata = grpc.aio.Metadata.from_tuple(tuple(details.metadata or ()))
        correlation_id = context.correlation_id.get()
        if correlation_id and REQUEST_ID_KEY not in metadata:
            metadata.add(REQUEST_ID_KEY, correlation_id)
        token = context.bearer_token.get() or (self.service_token() if self.service_token else "")
        if token and AUTHORIZATION_KEY not in metadata:
            metadata.add(AUTHORIZATION_KEY, f"Bearer {token}")
        timeout = self.timeout_seconds if details.timeout is None else details.timeout
        return details._replace(metadata=metadata, timeout=timeout)


class _UnaryUnaryInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, policy: _CallPolicy) -> None:
        self._policy = policy

    async def intercept_unary_unary(
        self,
        continuation: UnaryContinuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> grpc.aio.UnaryUnaryCall:
        details = self._policy.prepare(client_call_details)
        method = _method_name(details.method)
        labels = metrics.RpcLabels.of(method, request_streaming=False, response_streaming=False)
        deadline = time.monotonic() + details.timeout

        async def attempt() -> grpc.aio.UnaryUnaryCall:
            return await self._attempt(continuation, details, request, labels, deadline)

        retry = self._policy.retry
        if labels.grpc_method not in self._policy.safe_methods or retry.max_attempts < 2:
            return await attempt()
        # Nearly every call succeeds at once: the retry machinery (a tenth of a millisecond a
        # call) is only set up once the first attempt has met UNAVAILABLE.
        try:
            return await attempt()
        except grpc.aio.AioRpcError as exc:
            first_backoff = random.uniform(0, min(retry.initial_backoff_seconds, retry.max_backoff_seconds))
            if not _is_unavailable(exc) or deadline - time.monotonic() <= first_backoff:
                raise
        await asyncio.sleep(first_backoff)
        # Attempts 2..max_attempts, their backoff ranges going on doubling from the first one's.
        retrying = AsyncRetrying(
            stop=stop_after_attempt(retry.max_attempts - 1)
            | stop_before_delay(max(deadline - time.monotonic(), 0.0)),
            wait=wait_random_exponential(
                multiplier=2 * retry.initial_backoff_seconds, max=retry.max_backoff_seconds
            ),
            retry=retry_if_exception(_is_unavailable),
            reraise=True,
        )
        return await retrying(attempt)

    async def _attempt(
        self,
        continuation: UnaryContinuation,
        details: grpc.aio.ClientCallDetails,
        request: Any,
        labels: metrics.RpcLabels,
        deadline: float,
    ) -> grpc.aio.UnaryUnaryCall:
        try:
            with self._policy.breaker.calling():
                return await self._send(continuation, details, request, labels, deadline)
        except pybreaker.CircuitBreakerError:
            raise Unavailable(
                f"calls to {self._policy.name} are paused after repeated failures", reason="CIRCUIT_OPEN"
            ) from None

    @staticmethod
    async def _send(
        continuation: UnaryContinuation,
        details: grpc.aio.ClientCallDetails,
        request: Any,
        labels: metrics.RpcLabels,
        deadline: float,
    ) -> grpc.aio.UnaryUnaryCall:
        metrics.client_started.labels(*labels.values()).inc()
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            # Each attempt gets what is left of the one deadline of the whole call.
            call = await continuation(
                details._replace(timeout=max(deadline - time.monotonic(), 0.0)), request
            )
            await call
            code = grpc.StatusCode.OK
            # The call itself, not its response, so the caller can still read its metadata.
            return call
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            metrics.observe_client_handled(labels, code, time.perf_counter() - started)


class _UnaryStreamInterceptor(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, policy: _CallPolicy) -> None:
        self._policy = policy

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[grpc.aio.UnaryStreamCall]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> grpc.aio.UnaryStreamCall:
        return await continuation(self._policy.prepare(client_call_details), request)


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


def _is_outage(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _OUTAGE_CODES


def _is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() is grpc.StatusCode.UNAVAILABLE
