"""Standard gRPC metrics (the go-grpc-prometheus names), `tally_build_info` and `/metrics`.

Labels are bounded: `grpc_type`, `grpc_service` (fully qualified, e.g.
`tally.catalog.v1.CatalogService`), `grpc_method` and `grpc_code` (e.g. `OK`). Business
metrics live beside the code that counts them, prefixed `tally_`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

_RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
_HANDLED_LABELS = (*_RPC_LABELS, "grpc_code")

server_started = Counter("grpc_server_started_total", "RPCs started on the server.", _RPC_LABELS)
server_handled = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, whatever their status.", _HANDLED_LABELS
)
server_handling_seconds = Histogram(
    "grpc_server_handling_seconds", "Time the server took to handle an RPC.", _RPC_LABELS
)
server_msg_received = Counter(
    "grpc_server_msg_received_total", "Request messages received by the server.", _RPC_LABELS
)
server_msg_sent = Counter("grpc_server_msg_sent_total", "Response messages sent by the server.", _RPC_LABELS)

client_started = Counter("grpc_client_started_total", "RPCs started by clients.", _RPC_LABELS)
client_handled = Counter(
    "grpc_client_handled_total", "RPCs completed by clients, whatever their status.", _HANDLED_LABELS
)
client_handling_seconds = Histogram(
    "grpc_client_handling_seconds", "Time from starting an RPC to its completion, on the client.", _RPC_LABELS
)

build_info = Gauge("tally_build_info", "Always 1; labels name the running build.", ("service", "version"))


# (request_streaming, response_streaming) → grpc_type
_RPC_TYPES = {
    (False, False): "UNARY",
    (False, True): "SERVER_STREAM",
    (True, False): "CLIENT_STREAM",
    (True, True): "BIDI_STREAM",
}


@dataclass(frozen=True)
class RpcLabels:
    """The bounded labels of one RPC method."""

    grpc_type: str
    grpc_service: str
    grpc_method: str

    @classmethod
    def of(cls, full_method: str, *, request_streaming: bool, response_streaming: bool) -> RpcLabels:
        """Labels for `/package.Service/Method`."""
        service, _, method = full_method.lstrip("/").partition("/")
        return cls(_RPC_TYPES[request_streaming, response_streaming], service, method)

    def values(self) -> tuple[str, str, str]:
        return self.grpc_type, self.grpc_service, self.grpc_method


class ServerMethodMetrics:
    """The `grpc_server_*` series of one method, bound once: `.labels()` on every call would
    take the metric's lock and look its labels up each time."""

    __slots__ = ("_handled", "_handling_seconds", "_label_values", "_received", "_sent", "_started")

    def __init__(self, labels: RpcLabels) -> None:
        values = labels.values()
        self._label_values = values
        self._started = server_started.labels(*values)
        self._received = server_msg_received.labels(*values)
        self._sent = server_msg_sent.labels(*values)
        self._handling_seconds = server_handling_seconds.labels(*values)
        self._handled: dict[grpc.StatusCode, Counter] = {}

    def started(self) -> None:
        # A unary or server-streaming call has received its one request when it starts.
        self._started.inc()
        self._received.inc()

    def message_sent(self) -> None:
        self._sent.inc()

    def handled(self, code: grpc.StatusCode, seconds: float) -> None:
        counter = self._handled.get(code)
        if counter is None:
            counter = self._handled[code] = server_handled.labels(*self._label_values, code.name)
        counter.inc()
        self._handling_seconds.observe(seconds)


def observe_client_handled(labels: RpcLabels, code: grpc.StatusCode, seconds: float) -> None:
    client_handled.labels(*labels.values(), code.name).inc()
    client_handling_seconds.labels(*labels.values()).observe(seconds)


def record_build_info(service: str, version: str) -> None:
    build_info.labels(service, version).set(1)


@dataclass
class MetricsServer:
    """The running `/metrics` endpoint; `close()` frees its port."""

    port: int
    _httpd: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def start_metrics_server(host: str, port: int) -> MetricsServer:
    """Serve the default registry on `http://host:port/metrics`; port 0 picks a free port."""
    httpd, thread = start_http_server(port, addr=host)
    return MetricsServer(port=httpd.server_port, _httpd=httpd, _thread=thread)
