"""`python -m tally_payment_gateway` serves the payment gateway; `python -m tally_payment_gateway
migrate` migrates the control database and every merchant database (the Helm pre-upgrade hook
runs it)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from tally_kit.logging import configure_logging
from tally_kit.server import run

from tally_payment_gateway.app import build_app, build_directory
from tally_payment_gateway.settings import PaymentGatewaySettings

log = logging.getLogger("tally_payment_gateway.migrate")


async def migrate(settings: PaymentGatewaySettings) -> None:
    directory = build_directory(settings)
    await directory.start()
    try:
        applied = await directory.migrate_all()
    finally:
        await directory.close()
    changed = {merchant: names for merchant, names in applied.items() if names}
    log.info(
        "migrated %d merchant databases, %d changed",
        len(applied),
        len(changed),
        extra={"changed": changed},
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tally_payment_gateway", description=__doc__)
    parser.add_argument("command", nargs="?", choices=["serve", "migrate"], default="serve")
    command = parser.parse_args().command
    if command == "migrate":
        settings = PaymentGatewaySettings()
        configure_logging(settings.service_name, settings.log_level)
        asyncio.run(migrate(settings))
    else:
        run(build_app)


if __name__ == "__main__":
    main()
