"""Security settings of a bitsmith stack: TLS, who may call, and the limits on what they may ask.

One YAML file (`bitsmith serve|up --security FILE`, or `$BITSMITH_SECURITY`) is loaded into the frozen
`SecurityConfig` and checked on load, so a typo fails the start with the key it concerns instead of
leaving a service open. No file means what bitsmith always did: plaintext gRPC, anyone may call.

Tokens appear in the file only as sha256 digests: the file can be read by whoever runs the services
without handing out what clients present. The one secret the services must hold in plain is the
service token, which the coordinator presents to its workers; it lives in its own file
(`service_token_file`), never in this one.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitsmith.errors import ConfigError

SECURITY_ENV = "BITSMITH_SECURITY"
MAX_CONFIG_BYTES = 1 << 20
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
SERVICE_CLIENT = "bitsmith-coordinator"
"""The client name the workers see for the coordinator when it presents the service token."""


def token_digest(token: str) -> str:
    """The sha256 (hex) under which a token is listed in the config."""
    return hashlib.sha256(token.encode()).hexdigest()


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How a client verifies a TLS server and, for mTLS, proves itself: PEM files (None: system roots / no cert)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    """The name the server's certificate must carry, when not the host it is reached at: Ray places the
    workers at node addresses the operator does not know in advance, so their certificates name a
    service ("bitsmith-worker") instead."""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("a client certificate needs its key and a key its certificate (tls.client_cert, "
                              "tls.client_key)")

    def pem(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(root certificates, private key, certificate chain) as `grpc.ssl_channel_credentials` takes them."""
        return (_read(self.ca, "the CA certificate") if self.ca else None,
                _read(self.key, "the client key") if self.key else None,
                _read(self.cert, "the client certificate") if self.cert else None)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The servers' certificate and key; `client_ca` turns on mTLS toward the workers; `client` is how the
    coordinator (and a CLI on the same host) reaches TLS servers."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    client: ClientTls = field(default_factory=ClientTls)

    def pem(self) -> tuple[bytes, bytes]:
        """(private key, certificate chain) of the servers."""
        return _read(self.key, "the server key (tls.key)"), _read(self.cert, "the server certificate (tls.cert)")

    def client_ca_pem(self) -> bytes | None:
        """The CA that signs the certificates clients must present (None: none is asked for)."""
        return _read(self.client_ca, "the client CA (tls.client_ca)") if self.client_ca else None


@dataclass(frozen=True, slots=True)
class Grant:
    """What one token stands for: a client of a project, the directories the project's jobs may read and
    write, and whether it may see every project's jobs (admin)."""

    client: str
    project: str
    roots: tuple[Path, ...] = ()
    admin: bool = False

    def confines(self, path: str | Path) -> bool:
        """Whether `path`, its symlinks resolved, lies under one of the roots (admins too: roots bound what a
        job reads and writes, admin only what a caller sees)."""
        resolved = Path(path).resolve()
        return any(resolved.is_relative_to(root) for root in self.roots)


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-client and per-request ceilings of the JobService; None: no limit."""

    max_jobs_per_client: int | None = None
    """Queued plus running jobs one client may have."""
    max_model_bytes: int | None = None
    """The largest checkpoint (sum of its *.safetensors files) a job may quantize."""
    max_request_bytes: int | None = None
    """The largest request message the JobService accepts (None: the server's own bound)."""
    max_gpus_per_job: int | None = None
    """The most solver replicas (GPUs) one job may lease."""


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """The whole security setting of a stack (see the module docstring and docs/security.md)."""

    tls: TlsConfig | None = None
    tokens: Mapping[str, Grant] = field(default_factory=dict)
    """Grants by the sha256 of their token; empty: the JobService takes anonymous calls."""
    service_token_file: Path | None = None
    limits: Limits = field(default_factory=Limits)

    @property
    def authenticates_clients(self) -> bool:
        return bool(self.tokens)

    @property
    def mutual_tls(self) -> bool:
        return self.tls is not None and self.tls.client_ca is not None

    def service_token(self) -> str | None:
        """The token the coordinator presents to its workers (read from its file each time it is needed)."""
        if self.service_token_file is None:
            return None
        token = _read(self.service_token_file, "the service token (service_token_file)").decode().strip()
        if not token:
            raise ConfigError(f"service_token_file {self.service_token_file} is empty")
        return token

    @classmethod
    def load(cls, path: str | Path) -> SecurityConfig:
        """Read and check a security file; relative paths in it are relative to the file."""
        import yaml

        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ConfigError(f"cannot read the security config {path}: {exc.strerror or exc}") from None
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"security config {path} is {size} bytes; the limit is {MAX_CONFIG_BYTES}")
        try:
            data = yaml.safe_load(_read(path, "the security config").decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"security config {path} is not valid YAML: {exc}") from None
        return _Loader(path).config(data or {})

    @classmethod
    def from_env(cls) -> SecurityConfig | None:
        """The config `$BITSMITH_SECURITY` names, or None when it names none."""
        path = os.environ.get(SECURITY_ENV)
        return cls.load(path) if path else None


class _Loader:
    """Turns the parsed YAML into a `SecurityConfig`, naming the offending key in every error."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._base = path.parent

    def _error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"security config {self._path}: {key}: {message}")

    def _mapping(self, value: Any, key: str, allowed: set[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self._error(key, f"must be a mapping, got {type(value).__name__}")
        if unknown := sorted(set(value) - allowed):
            raise self._error(key, f"unknown keys {unknown}; allowed: {sorted(allowed)}")
        return value

    def _file(self, value: Any, key: str) -> Path:
        if not isinstance(value, str) or not value:
            raise self._error(key, "must be a file path")
        path = (self._base / value).resolve()
        if not path.is_file():
            raise self._error(key, f"{path} is not a file")
        return path

    def _optional_file(self, data: Mapping[str, Any], name: str, key: str) -> Path | None:
        return self._file(data[name], f"{key}.{name}") if data.get(name) is not None else None

    def _name(self, value: Any, key: str) -> str | None:
        if value is not None and (not isinstance(value, str) or not value):
            raise self._error(key, f"must be a host name, got {value!r}")
        return value

    def _positive(self, data: Mapping[str, Any], name: str) -> int | None:
        value = data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self._error(f"limits.{name}", f"must be a positive integer, got {value!r}")
        return value

    def config(self, data: Any) -> SecurityConfig:
        data = self._mapping(data, "(top level)", {"tls", "tokens", "service_token_file", "limits"})
        tls = self._tls(data["tls"]) if data.get("tls") is not None else None
        tokens = self._tokens(data.get("tokens") or [])
        service_token_file = self._optional_file(data, "service_token_file", "(top level)")
        config = SecurityConfig(tls=tls, tokens=tokens, service_token_file=service_token_file,
                                limits=self._limits(data.get("limits") or {}))
        if tokens and not config.mutual_tls and service_token_file is None:
            raise self._error("tokens", "clients need tokens but the workers would take anyone's calls: set "
                                        "tls.client_ca (mTLS) or service_token_file")
        if service_token_file is not None:
            config.service_token()  # an empty or unreadable file fails now, not at the first job
        return config

    def _tls(self, value: Any) -> TlsConfig:
        data = self._mapping(value, "tls", {"cert", "key", "ca", "client_ca", "client_cert", "client_key",
                                            "server_name"})
        for required in ("cert", "key"):
            if data.get(required) is None:
                raise self._error(f"tls.{required}", "is required when tls is given")
        try:
            client = ClientTls(ca=self._optional_file(data, "ca", "tls"),
                               cert=self._optional_file(data, "client_cert", "tls"),
                               key=self._optional_file(data, "client_key", "tls"),
                               server_name=self._name(data.get("server_name"), "tls.server_name"))
        except ConfigError as exc:
            raise self._error("tls", str(exc)) from None
        tls = TlsConfig(cert=self._file(data["cert"], "tls.cert"), key=self._file(data["key"], "tls.key"),
                        client_ca=self._optional_file(data, "client_ca", "tls"), client=client)
        if tls.client_ca is not None and client.cert is None:
            raise self._error("tls.client_cert", "workers require client certificates (tls.client_ca), so the "
                                                 "coordinator needs one")
        return tls

    def _tokens(self, value: Any) -> dict[str, Grant]:
        if not isinstance(value, list):
            raise self._error("tokens", f"must be a list, got {type(value).__name__}")
        grants: dict[str, Grant] = {}
        for i, item in enumerate(value):
            key = f"tokens[{i}]"
            entry = self._mapping(item, key, {"sha256", "client", "project", "roots", "admin"})
            digest = entry.get("sha256")
            if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
                raise self._error(f"{key}.sha256", "must be the token's sha256 as 64 lowercase hex digits "
                                                   "(`printf %s TOKEN | sha256sum`), never the token itself")
            if digest in grants:
                raise self._error(f"{key}.sha256", "the same token is listed twice")
            names = {}
            for name in ("client", "project"):
                if not isinstance(entry.get(name), str) or not entry[name]:
                    raise self._error(f"{key}.{name}", "must be a non-empty string")
                names[name] = entry[name]
            admin = entry.get("admin", False)
            if not isinstance(admin, bool):
                raise self._error(f"{key}.admin", f"must be true or false, got {admin!r}")
            grants[digest] = Grant(client=names["client"], project=names["project"],
                                   roots=self._roots(entry.get("roots") or [], f"{key}.roots"), admin=admin)
        return grants

    def _roots(self, value: Any, key: str) -> tuple[Path, ...]:
        if not isinstance(value, list) or not all(isinstance(r, str) and r for r in value):
            raise self._error(key, "must be a list of directories")
        roots = tuple((self._base / r).resolve() for r in value)
        for root in roots:
            if not root.is_dir():
                raise self._error(key, f"{root} is not a directory")
        return roots

    def _limits(self, value: Any) -> Limits:
        names = ("max_jobs_per_client", "max_model_bytes", "max_request_bytes", "max_gpus_per_job")
        data = self._mapping(value, "limits", set(names))
        return Limits(**{name: self._positive(data, name) for name in names})


_scope: ContextVar[SecurityConfig | None] = ContextVar("bitsmith_security", default=None)


def scoped() -> SecurityConfig | None:
    """The config `securing` put in force around the current code, if any."""
    return _scope.get()


@contextmanager
def securing(config: SecurityConfig | None) -> Iterator[None]:
    """Put `config` in force for the servers built and the service channels opened inside the block.

    The worker services' `create_server`s and the coordinator's connection to them take no security
    argument (they are the same with or without it), so the config reaches them this way: the code
    that starts them (`bitsmith_services.registry.start_service`, the coordinator's `create_server`)
    holds the scope around the start.
    """
    token = _scope.set(config)
    try:
        yield
    finally:
        _scope.reset(token)
