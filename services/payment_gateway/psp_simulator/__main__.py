"""`python -m psp_simulator`: serve the PSP simulator (see the package docstring)."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

import uvicorn
from tally_payment_gateway.settings import SIMULATOR_ACCOUNT

from psp_simulator.api import Timing, create_app
from psp_simulator.bank import AccountFamily, Bank
from psp_simulator.notifier import Notifier


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m psp_simulator", description="Serve the PSP simulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090, help="0 picks a free port")
    parser.add_argument("--slow-seconds", type=float, default=2.0, help="how long `slow` answers wait")
    parser.add_argument(
        "--hang-seconds",
        type=float,
        default=60.0,
        help="how long `timeout` and `lost` keep the caller waiting",
    )
    parser.add_argument(
        "--webhook-url",
        default=os.environ.get("PSP_SIMULATOR_WEBHOOK_URL"),
        help=(
            "where the notifications of each merchant's account go, {merchant} standing for the "
            "merchant, e.g. http://127.0.0.1:8080/v1/webhooks/authorize-net/{merchant} "
            "(default: $PSP_SIMULATOR_WEBHOOK_URL, else none)"
        ),
    )
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)

    # The payment gateway's development default signs each merchant in as its own account.
    merchants = AccountFamily(
        login=SIMULATOR_ACCOUNT.api_login_id,
        transaction_key=SIMULATOR_ACCOUNT.transaction_key.get_secret_value(),
        signature_key=SIMULATOR_ACCOUNT.signature_key.get_secret_value(),
        webhook_url=args.webhook_url,
    )
    app = create_app(
        Bank(accounts={}, family=merchants),
        Notifier(),
        Timing(slow_seconds=args.slow_seconds, hang_seconds=args.hang_seconds),
    )
    # Bound here rather than by uvicorn, so that with --port 0 the port is known and printed.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    # Listening before the line is printed: a client that connects as soon as it reads it waits
    # in the backlog until uvicorn has started, rather than being refused.
    listener.listen()
    host, port = listener.getsockname()[:2]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=1, access_log=False)
    )
    print(f"psp_simulator listening on http://{host}:{port}", flush=True)
    asyncio.run(server.serve(sockets=[listener]))


if __name__ == "__main__":
    main()
