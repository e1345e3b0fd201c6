"""`python -m tally_gateway` as it is deployed: settings from `GATEWAY_*` variables, JSON log
lines on stdout, and a graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest
from gateway_e2e import CATALOG, LEDGER, Upstreams, token

pytestmark = pytest.mark.integration

GATEWAY_SOURCES = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_the_gateway_process_serves_logs_json_and_stops_on_sigterm(upstreams: Upstreams) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(GATEWAY_SOURCES), os.environ.get("PYTHONPATH")])),
        "GATEWAY_HTTP_HOST": "127.0.0.1",
        "GATEWAY_HTTP_PORT": str(port),
        "GATEWAY_UPSTREAMS": json.dumps({CATALOG: upstreams.catalog_target, LEDGER: upstreams.ledger_target}),
        "GATEWAY_READINESS_SERVICES": json.dumps([CATALOG, LEDGER]),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tally_gateway", env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            for _ in range(100):
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.returncode is None, "the gateway exited during start-up"
                await asyncio.sleep(0.1)
            answer = await client.get(
                "/v1/merchants/nobody-here/users/u-1/balance",
                headers={
                    "authorization": f"Bearer {token(upstreams.catalog, 'platform')}",
                    "x-request-id": "p-1",
                },
            )
            assert answer.headers["x-request-id"] == "p-1" and answer.status_code == 404
        process.send_signal(signal.SIGTERM)
        stdout, _ = await asyncio.wait_for(process.communicate(), timeout=15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines = [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]
    messages = [line["message"] for line in lines]
    # uvicorn stops gracefully (the lifespan closes the upstream channels), then ends the
    # process by the signal it received, as a supervisor expects.
    assert messages[-3:] == [
        "Waiting for application shutdown.",
        "Application shutdown complete.",
        messages[-1],
    ]
    assert messages[-1].startswith("Finished server process")
    assert process.returncode == -signal.SIGTERM
    assert all(line["service"] == "gateway" for line in lines)
    [access] = [line for line in lines if line.get("correlation_id") == "p-1"]
    assert access["logger"] == "tally_gateway.access" and access["status"] == 404
    assert access["route"] == "/v1/merchants/{merchant_id}/users/{user_id}/balance"
    assert "gateway ready" in messages
