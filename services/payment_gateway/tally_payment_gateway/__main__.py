"""`python -m tally_payment_gateway` serves the payment gateway; `python -m tally_payment_gateway
migrate` migrates the control database and every merchant database (the Helm pre-upgrade hook
runs it)."""

from __future__ import annotations

from tally_kit.server import serve_or_migrate

from tally_payment_gateway.app import build_app, build_directory
from tally_payment_gateway.settings import PaymentGatewaySettings


def main() -> None:
    serve_or_migrate("tally_payment_gateway", __doc__, PaymentGatewaySettings, build_app, build_directory)


if __name__ == "__main__":
    main()
