"""`python -m tally_gateway`: serve the HTTP gateway with uvicorn until SIGTERM or SIGINT.

uvicorn stops accepting on SIGTERM, lets requests in flight finish (up to
`shutdown_grace_seconds`), then the app's lifespan closes the upstream channels.
"""

from __future__ import annotations

import uvicorn
from tally_kit.logging import configure_logging

from tally_gateway.app import build_app
from tally_gateway.settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings()
    configure_logging(settings.service_name, settings.log_level)
    uvicorn.run(
        build_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        # Logging stays the kit's JSON lines; the gateway writes its own access log.
        log_config=None,
        http="httptools",
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        server_header=False,
    )


if __name__ == "__main__":
    main()
