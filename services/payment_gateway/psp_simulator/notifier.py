"""Webhook notifications signed as Authorize.Net signs them, delivered in the background."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from psp_simulator.bank import Account
from psp_simulator.wire import render_json

_log = logging.getLogger(__name__)
_WEBHOOK_NAMESPACE = uuid.UUID("0b7a52ee-93a5-4f0e-9a61-3d8c5f0f7e11")


@dataclass
class SentNotification:
    notification_id: str
    event_type: str
    url: str
    body: bytes
    signature: str
    attempts: int = 0
    delivered: bool = False
    # The receiver's last HTTP status, or the error that kept the delivery from it.
    last_result: str = ""


class Notifier:
    def __init__(self, *, attempts: int = 3, timeout_seconds: float = 5.0) -> None:
        self._attempts = attempts
        self._client = httpx.AsyncClient(timeout=timeout_seconds)
        self._deliveries: set[asyncio.Task[None]] = set()
        self.sent: dict[str, SentNotification] = {}

    def notify(self, account: Account, event_type: str, payload: dict[str, Any]) -> SentNotification | None:
        """Sign a notification and deliver it in the background; None when the account has no URL."""
        if not account.webhook_url:
            return None
        notification_id = str(uuid.uuid4())
        document = {
            "notificationId": notification_id,
            "eventType": event_type,
            "eventDate": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "webhookId": str(uuid.uuid5(_WEBHOOK_NAMESPACE, account.login)),
            "payload": payload,
        }
        body = render_json(document).encode()
        digest = hmac.new(account.signature_key.encode(), body, hashlib.sha512).hexdigest().upper()
        sent = SentNotification(notification_id, event_type, account.webhook_url, body, f"sha512={digest}")
        self.sent[notification_id] = sent
        self._deliver_later(sent)
        return sent

    def resend(self, notification_id: str) -> SentNotification | None:
        """Deliver a notification again, byte for byte, as Authorize.Net's retries do."""
        sent = self.sent.get(notification_id)
        if sent is not None:
            self._deliver_later(sent)
        return sent

    async def aclose(self) -> None:
        for delivery in list(self._deliveries):
            delivery.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        await self._client.aclose()

    def _deliver_later(self, sent: SentNotification) -> None:
        delivery = asyncio.create_task(self._deliver(sent))
        self._deliveries.add(delivery)
        delivery.add_done_callback(self._deliveries.discard)

    async def _deliver(self, sent: SentNotification) -> None:
        headers = {"Content-Type": "application/json", "X-ANET-Signature": sent.signature}
        for attempt in range(self._attempts):
            sent.attempts += 1
            try:
                response = await self._client.post(sent.url, content=sent.body, headers=headers)
            except httpx.HTTPError as exc:
                sent.last_result = type(exc).__name__
            else:
                sent.last_result = str(response.status_code)
                if response.is_success:
                    sent.delivered = True
                    return
            await asyncio.sleep(0.2 * 4**attempt)
        _log.warning(
            "notification %s not delivered to %s: %s", sent.notification_id, sent.url, sent.last_result
        )
