"""`make demo`: a merchant's first day on Tally, driven through the HTTP gateway.

Needs the suite running (`make run` in another terminal). Each step prints the call it
makes and what came back: a merchant with its legal details, a credit pack and its price,
an operation type; a user buys the pack with a card token (the PSP simulator approves
it), the captured payment becomes a lot in the ledger and a receipt; the user runs an
operation; then the balance, the ledger history and the receipt PDF; finally the provider
settles the day's captures, the user is refunded, the ledger revokes the lot and the receipt
service issues a credit note.
"""

from __future__ import annotations

import argparse
import base64
import io
import secrets
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from pypdf import PdfReader
from tally_gateway.settings import GatewaySettings
from tally_kit.auth import issue_dev_token
from tally_launcher.__main__ import SIMULATOR_PORT

WAIT_SECONDS = 20.0
# Where the receipt PDF is written (ignored by git).
OUTPUT = Path(__file__).resolve().parent.parent / "var" / "demo"


class Demo:
    def __init__(self, base_url: str, merchant_id: str, simulator_url: str) -> None:
        settings = GatewaySettings()
        self.merchant_id = merchant_id
        self.simulator_url = simulator_url
        self.client = httpx.Client(base_url=base_url, timeout=10.0)
        self.tokens = {
            "platform": issue_dev_token(settings, role="platform", merchant_id=None, subject="demo"),
            "admin": issue_dev_token(settings, role="admin", merchant_id=merchant_id, subject="demo-admin"),
            "app": issue_dev_token(settings, role="app", merchant_id=merchant_id, subject="demo-app"),
        }
        self.step = 0

    def call(self, role: str, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[role]}", "X-Request-Id": str(uuid.uuid4())}
        if method == "POST":
            headers["Idempotency-Key"] = str(uuid.uuid4())
        reply = self.client.request(method, path, json=body, headers=headers)
        print(f"    {method} {path} -> {reply.status_code}")
        if reply.status_code >= 400:
            raise SystemExit(f"demo stopped: {reply.status_code} {reply.text}")
        return reply.json()

    def say(self, text: str) -> None:
        self.step += 1
        print(f"\n{self.step}. {text}")

    def wait_for(self, what: str, check: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            if result := check():
                return result
            time.sleep(0.3)
        raise SystemExit(f"demo stopped: {what} did not happen within {WAIT_SECONDS:.0f} s")


def run(demo: Demo) -> None:
    m = f"/v1/merchants/{demo.merchant_id}"
    user = "user-ada"

    demo.say(f"The platform creates merchant {demo.merchant_id} with its legal details and tax regime")
    merchant = demo.call(
        "platform",
        "POST",
        "/v1/merchants",
        {
            "merchantId": demo.merchant_id,
            "config": {
                "legalName": "Demo Studio SAS",
                "taxId": "FR40123456824",
                "address": {
                    "addressLines": ["10 rue du Demo"],
                    "locality": "Paris",
                    "postalCode": "75011",
                    "regionCode": "FR",
                },
                "receiptSeriesPrefix": "DEMO",
                "taxRegime": {"ratePercent": "20", "pricesIncludeTax": True},
                "operationTimeout": "900s",
                "retentionDays": 3650,
                "defaultCurrency": "EUR",
            },
        },
    )["merchant"]
    print(f"    created {merchant['merchantId']}: {merchant['config']['legalName']}")

    demo.say("Its control app adds a pack of 100 credits valid 30 days, priced 9.90 EUR")
    product = demo.call(
        "admin",
        "POST",
        f"{m}/products",
        {
            "name": "Starter pack",
            "credits": {"value": "100"},
            "accessPeriodDays": 30,
            "distribution": "PRODUCT_DISTRIBUTION_SELLABLE",
        },
    )["product"]
    demo.call("admin", "POST", f"{m}/products/{product['productId']}/prices", {"price": _eur(990)})
    print(f"    product {product['productId']}: {product['credits']['value']} credits")

    demo.say("...and an operation type: rendering an image costs 2.5 credits")
    version = demo.call(
        "admin",
        "POST",
        f"{m}/operationTypes/image.render/versions",
        {"resourceUnit": "image", "creditsPerUnit": {"value": "2.5"}},
    )["operationTypeVersion"]
    print(
        f"    {version['operationCode']} v{version['version']}:"
        f" {version['creditsPerUnit']['value']} credits per image"
    )

    demo.say(f"The upstream app registers {user} and buys the pack with a card token")
    demo.call("app", "POST", f"{m}/users/{user}:register", {})
    order_id = f"order-{secrets.token_hex(4)}"
    payment = demo.call(
        "app",
        "POST",
        f"{m}/payments:purchase",
        {
            "userId": user,
            "orderId": order_id,
            "productId": product["productId"],
            "amount": _eur(990),
            "paymentSource": {
                "oneTimeToken": {"descriptor": "COMMON.ACCEPT.INAPP.PAYMENT", "value": "demo-card-token"}
            },
            "description": "Starter pack",
        },
    )["payment"]
    print(f"    payment {payment['paymentId']}: {payment['state']}")

    demo.say("The captured payment reaches the ledger over RabbitMQ: a lot of 100 credits")
    balance = demo.wait_for(
        "the lot",
        lambda: (
            (b := demo.call("app", "GET", f"{m}/users/{user}/balance")["balance"])
            and b["balance"]["value"] != "0"
            and b
        ),
    )
    print(f"    balance {balance['balance']['value']} credits")

    demo.say("The user renders 3 images: open an operation, record the usage, close it")
    operation = demo.call(
        "app", "POST", f"{m}/users/{user}/operations", {"operationCode": "image.render", "workflowId": "wf-1"}
    )["operation"]
    closed = demo.call(
        "app", "POST", f"{m}/operations/{operation['operationId']}:recordAndClose", {"resourceAmount": "3"}
    )
    print(f"    operation {closed['operation']['operationId']}: {closed['operation']['state']}")

    demo.say("Balance and ledger history")
    balance = demo.call("app", "GET", f"{m}/users/{user}/balance")["balance"]
    print(f"    balance {balance['balance']['value']} credits, debt {balance['debt']['value']}")
    for entry in demo.call("app", "GET", f"{m}/users/{user}/ledger")["entries"]:
        print(f"    {entry['createTime']}  {entry['kind']:<28} {entry['amount']['value']:>8}")

    demo.say("The receipt service issued a receipt for the purchase; fetch its PDF")
    receipt = demo.wait_for(
        "the receipt",
        lambda: next(iter(demo.call("app", "GET", f"{m}/users/{user}/receipts").get("receipts", [])), None),
    )
    totals = receipt["totals"]
    print(
        f"    receipt {receipt['number']}: net {totals['net']['amountMinor']},"
        f" tax {totals['tax']['amountMinor']}, gross {totals['gross']['amountMinor']}"
        f" {totals['gross']['currency']} (minor units)"
    )
    rendered = demo.call("app", "GET", f"{m}/receipts/{receipt['receiptId']}:renderPdf")
    pdf = base64.b64decode(rendered["pdf"])
    path = OUTPUT / rendered["fileName"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pdf)
    text = " ".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    print(f"    wrote {path} ({len(pdf)} bytes); it reads: {' '.join(text.split())[:160]}...")

    demo.say("The provider settles the day's captures (the simulator is told to), then the user is refunded")
    settled = httpx.post(f"{demo.simulator_url}/_simulator/settle", timeout=10.0)
    settled.raise_for_status()
    print(f"    provider batch {settled.json()['batchId']} settled")
    refunded = demo.call(
        "app",
        "POST",
        f"{m}/payments/{payment['paymentId']}:refund",
        {"reason": "the user changed their mind"},
    )["payment"]
    print(f"    payment {refunded['paymentId']}: {refunded['state']}")

    demo.say("The refund reaches the ledger, which revokes what is left of the lot, and the receipt service")
    found = demo.wait_for(
        "the credit note",
        lambda: (
            (r := demo.call("app", "GET", f"{m}/receipts/{receipt['receiptId']}")).get("creditNotes") and r
        ),
    )
    note = found["creditNotes"][0]
    print(
        f"    credit note {note['number']} for receipt {note['receiptNumber']}:"
        f" gross {note['amounts']['gross']['amountMinor']} {note['amounts']['gross']['currency']},"
        f" tax {note['amounts']['tax']['amountMinor']} (minor units)"
    )
    balance = demo.call("app", "GET", f"{m}/users/{user}/balance")["balance"]
    print(f"    balance {balance['balance']['value']} credits, debt {balance['debt']['value']}")
    print("\nDone.")


def _eur(amount_minor: int) -> dict[str, Any]:
    return {"amountMinor": str(amount_minor), "currency": "EUR"}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gateway", default=f"http://127.0.0.1:{GatewaySettings().http_port}")
    parser.add_argument("--merchant", default=f"demo-{secrets.token_hex(3)}")
    parser.add_argument(
        "--simulator",
        default=f"http://127.0.0.1:{SIMULATOR_PORT}",
        help="the PSP simulator `make run` starts",
    )
    args = parser.parse_args()
    try:
        ready = httpx.get(f"{args.gateway}/readyz", timeout=3.0).status_code == 200
    except httpx.HTTPError:
        ready = False
    if not ready:
        print(
            f"The suite is not answering at {args.gateway}/readyz: start it with `make run`.", file=sys.stderr
        )
        return 2
    run(Demo(args.gateway, args.merchant, args.simulator))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
