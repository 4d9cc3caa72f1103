"""The coordinator's HTTP port: `GET /healthz`, `GET /metrics` and `GET /jobs/<id>/report`.

Built on the standard library's `ThreadingHTTPServer` rather than wsgiref around prometheus_client's
WSGI app: that app serves nothing but metrics, so three routes would need a WSGI router on top, while
one request handler routes three read-only paths in a few lines. prometheus_client still writes the
exposition (and negotiates OpenMetrics); a thread per request keeps a slow report from holding up a
scrape; `shutdown()` stops the loop cleanly. Only GET and HEAD are served; every other method is
405. Answers are plain text, JSON or the report's HTML, never a traceback: failures are logged.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import grpc
from bitsmith import __version__
from bitsmith.errors import ConfigError, NotFoundError
from bitsmith.rpc.auth import AUTHORIZATION, bearer_token
from bitsmith.rpc.client import plain_channel
from bitsmith.rpc.security import ClientTls, Grant, token_digest
from bitsmith.v1 import job_pb2
from bitsmith_services.coordinator.jobstore import JOB_ID, JobStore
from bitsmith_services.coordinator.metrics import CoordinatorMetrics
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("bitsmith.coordinator.http")

REPORT_PATH = re.compile(r"/jobs/([^/]*)/report")
HEALTH_TIMEOUT_S = 2.0
TEXT = "text/plain; charset=utf-8"
WILDCARD_HOSTS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
"""Where a server bound to every interface is reached from its own process."""


@dataclass(frozen=True, slots=True)
class Response:
    status: HTTPStatus
    body: bytes
    content_type: str = TEXT
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: HTTPStatus, message: str) -> Response:
        return cls(status, (message + "\n").encode())

    @classmethod
    def json(cls, status: HTTPStatus, payload: dict[str, str]) -> Response:
        return cls(status, json.dumps(payload).encode(), "application/json")


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (as gRPC addresses are written)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_target(host: str, port: int) -> str:
    """The address a server bound to `host`:`port` answers at from its own process."""
    host = host.strip("[]")
    return host_port(WILDCARD_HOSTS.get(host, host), port)


class CoordinatorHttp:
    """The HTTP port of one coordinator: its job store, its metrics, and a health check of its gRPC server."""

    def __init__(self, host: str, port: int, *, jobs: JobStore, metrics: CoordinatorMetrics, grpc_target: str,
                 tls: ClientTls | None = None, grants: Mapping[str, Grant] | None = None) -> None:
        """`tls`: how to reach the JobService when it speaks TLS; `grants`: the tokens (by sha256) that may
        read reports, each its own project's (none: reports are open, like the JobService)."""
        self._jobs = jobs
        self._metrics = metrics
        self._grpc_target = grpc_target
        self._grants = dict(grants or {})
        self._channel = plain_channel(grpc_target, tls)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        try:
            self._server = _Server((host.strip("[]"), port), self)
        except (OSError, OverflowError) as exc:  # taken or not permitted; out of 0..65535
            self._channel.close()
            raise ConfigError(f"cannot bind the coordinator's HTTP port to {host_port(host, port)}: {exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, name="bitsmith-http", daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return host_port(str(host), int(port))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, wait for the loop to end, and release the port and the health channel."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
        self._channel.close()

    def respond(self, path: str, accept: str, authorization: str | None = None) -> Response:
        """The answer to a GET of `path` (a request target, with or without a query); `authorization` is
        the request's Authorization header, which a report needs when tokens are configured."""
        route = urlsplit(path).path
        try:
            if route == "/healthz":
                return self._healthz()
            if route == "/metrics":
                body, content_type = self._metrics.exposition(accept)
                return Response(HTTPStatus.OK, body, content_type)
            if match := REPORT_PATH.fullmatch(route):
                return self._report(match.group(1), authorization)
        except Exception:
            log.exception("the coordinator's HTTP port failed to answer", extra={"path": route})
            return Response.text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the coordinator's log")
        return Response.text(HTTPStatus.NOT_FOUND, f"no such path {route!r}; try /healthz, /metrics or "
                                                   "/jobs/<id>/report")

    def _healthz(self) -> Response:
        """200 while the JobService answers its gRPC health check, else 503 with the reason."""
        payload = {"version": __version__, "grpc": self._grpc_target}
        service = job_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=HEALTH_TIMEOUT_S)
        except grpc.RpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
            log.warning("health check failed", extra={"grpc": self._grpc_target, "reason": reason})
            return Response.json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "unavailable", "reason": reason,
                                                                 **payload})
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status).lower()
            return Response.json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": status, **payload})
        return Response.json(HTTPStatus.OK, {"status": "ok", **payload})

    def _report(self, job_id: str, authorization: str | None) -> Response:
        from bitsmith.report import ReportData, render_report  # matplotlib loads on the first report, not at start

        if not JOB_ID.fullmatch(job_id):
            return Response.text(HTTPStatus.BAD_REQUEST, f"{job_id!r} is not a job id (16 lowercase hex digits)")
        grant = None
        if self._grants:  # a report shows a job's model, paths and numbers: the JobService's rules apply
            token, why = bearer_token([(AUTHORIZATION, authorization)] if authorization else [])
            grant = self._grants.get(token_digest(token)) if token else None
            if grant is None:
                return Response(HTTPStatus.UNAUTHORIZED, ((why or "unknown token") + "\n").encode(),
                                headers={"WWW-Authenticate": 'Bearer realm="bitsmith"'})
        try:
            job = self._jobs.get(job_id)
        except NotFoundError:
            return Response.text(HTTPStatus.NOT_FOUND, f"no job {job_id}")
        if grant is not None and not grant.admin and job.project != grant.project:
            return Response.text(HTTPStatus.FORBIDDEN, f"job {job_id} belongs to another project than {grant.project}")
        return Response(HTTPStatus.OK, render_report(ReportData.from_job(job)).encode(), "text/html; charset=utf-8")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: CoordinatorHttp) -> None:
        self.app = app
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        """A request that broke the handler itself (not a route: those answer 500): log it, never print it."""
        log.exception("HTTP request failed", extra={"client": str(client_address)})


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = f"bitsmith/{__version__}"
    sys_version = ""
    error_content_type = TEXT
    error_message_format = "%(code)d %(message)s\n"
    ALLOWED = "GET, HEAD"

    def do_GET(self) -> None:
        self._send(self._response(), with_body=True)

    def do_HEAD(self) -> None:
        self._send(self._response(), with_body=False)

    def _response(self) -> Response:
        return self.server.app.respond(self.path, self.headers.get("Accept", ""), self.headers.get("Authorization"))

    def _method_not_allowed(self) -> None:
        # The request's body is never read, so the connection cannot carry another request.
        self.close_connection = True
        self._send(Response(HTTPStatus.METHOD_NOT_ALLOWED,
                            f"{self.command} is not served here; only {self.ALLOWED}\n".encode(),
                            headers={"Allow": self.ALLOWED, "Connection": "close"}), with_body=True)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _method_not_allowed

    def _send(self, response: Response, *, with_body: bool) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(response.body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("HTTP request", extra={"method": self.command, "path": self.path, "status": code})

    def log_error(self, format: str, *args: object) -> None:
        log.warning("bad HTTP request: " + format, *args, extra={"client": self.client_address[0]})
