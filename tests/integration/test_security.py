"""A secured stack on loopback: TLS everywhere, mTLS toward the workers, bearer tokens with projects and
roots, and the per-client limits, each checked against the real servers (certificates made here)."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from bitsmith.demo import DEMO_MODEL
from bitsmith.errors import (
    BitsmithError,
    ConfigError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServiceUnavailableError,
    UnauthenticatedError,
)
from bitsmith.rpc import Client, JobState, Resources
from bitsmith.rpc.client import open_channel
from bitsmith.rpc.security import ClientTls, SecurityConfig, token_digest
from bitsmith.schemes import Method
from bitsmith.v1 import job_pb2, packer_pb2, packer_pb2_grpc
from bitsmith_services.coordinator.jobstore import JobStore
from bitsmith_services.coordinator.placement import ServiceAddresses, StaticPlacement
from bitsmith_services.coordinator.server import create_server
from bitsmith_services.registry import Role, start_service
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import make_request

TOKENS = {"vision": "vision-secret", "audio": "audio-secret", "batch": "batch-secret", "admin": "admin-secret"}
MODEL_BYTES = (DEMO_MODEL / "model.safetensors").stat().st_size


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *, ca: bool = False,
           usage: x509.ObjectIdentifier | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for `subject` signed by `issuer` (None: self-signed), valid for loopback."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer or (_name(subject), key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def make_pki(directory: Path) -> None:
    """ca.pem; server.pem/.key (loopback); coordinator.pem/.key (a client certificate of the same CA)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _issue("bitsmith test CA", None, ca=True)
    _write(directory, "ca", ca_cert, ca_key)
    _write(directory, "server", *_issue("localhost", (ca_cert.subject, ca_key), usage=ExtendedKeyUsageOID.SERVER_AUTH))
    _write(directory, "coordinator", *_issue("bitsmith-coordinator", (ca_cert.subject, ca_key),
                                             usage=ExtendedKeyUsageOID.CLIENT_AUTH))


@dataclass
class Secured:
    address: str
    addresses: ServiceAddresses
    home: Path
    pki: Path
    config: SecurityConfig
    http: str

    @property
    def tls(self) -> ClientTls:
        return ClientTls(ca=self.pki / "ca.pem")

    def client(self, who: str | None) -> Client:
        return Client(self.address, token=TOKENS[who] if who else None, tls=self.tls, timeout=30)


def _grant(who: str, roots: list[Path], **extra: object) -> dict[str, object]:
    return {"sha256": token_digest(TOKENS[who]), "client": f"{who}-bot", "project": who,
            "roots": [str(r) for r in roots], **extra}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    home = tmp_path_factory.mktemp("secured")
    make_pki(home / "pki")
    for project in ("vision", "audio", "batch"):
        (home / project).mkdir()
    path = home / "security.yaml"
    path.write_text(yaml.safe_dump({
        "tls": {"cert": "pki/server.pem", "key": "pki/server.key", "ca": "pki/ca.pem", "client_ca": "pki/ca.pem",
                "client_cert": "pki/coordinator.pem", "client_key": "pki/coordinator.key"},
        "tokens": [_grant("vision", [home / "vision", DEMO_MODEL.parent]), _grant("audio", [home / "audio"]),
                   _grant("batch", [home / "batch", DEMO_MODEL.parent]),
                   _grant("admin", [home], admin=True)],
        "limits": {"max_jobs_per_client": 1, "max_model_bytes": MODEL_BYTES + 1024, "max_request_bytes": 64 * 1024,
                   "max_gpus_per_job": 2},
    }))
    config = SecurityConfig.load(path)
    servers = {role: start_service(role, "127.0.0.1:0", home / "store", security=config) for role in Role}
    addresses = ServiceAddresses({role: f"127.0.0.1:{port}" for role, (_, port) in servers.items()})
    server, port, coordinator = create_server("127.0.0.1:0", db_path=home / "jobs.sqlite",
                                              placement=StaticPlacement(addresses), http_port=0, security=config)
    assert coordinator.http_address is not None
    yield Secured(address=f"127.0.0.1:{port}", addresses=addresses, home=home, pki=home / "pki", config=config,
                  http=coordinator.http_address)
    server.stop(grace=1).wait()
    coordinator.shutdown()
    for s, _ in servers.values():
        s.stop(grace=1).wait()


@pytest.fixture(scope="module")
def vision_job(secured: Secured) -> str:
    """A whole RTN job of project vision, run over TLS with its token: the id of the succeeded job."""
    with secured.client("vision") as client:
        job = client.submit(make_request(secured.home / "vision" / "out", method=Method.RTN, calibrate=False))
        job.wait(timeout=120)
        assert job.state is JobState.SUCCEEDED, job.error
        assert job.artifacts and job.artifacts[0].path.is_dir()
        assert job.proto.owner == "vision-bot" and job.proto.project == "vision"
        return job.id


def test_a_full_job_runs_over_tls_with_a_valid_token(vision_job: str, secured: Secured) -> None:
    with secured.client("vision") as client:
        assert client.job(vision_job).state is JobState.SUCCEEDED


def test_calls_without_a_known_token_are_unauthenticated(secured: Secured, vision_job: str) -> None:
    for token, reason in ((None, "no credentials"), ("not-a-listed-token", "unknown token")):
        with Client(secured.address, token=token, tls=secured.tls) as client:
            with pytest.raises(UnauthenticatedError, match=reason):
                client.jobs()
            with pytest.raises(UnauthenticatedError):
                client.job(vision_job)
            with pytest.raises(UnauthenticatedError):
                list(client.calls.watch(vision_job))
    with grpc.secure_channel(secured.address, grpc.ssl_channel_credentials(secured.tls.pem()[0])) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING  # health checks need no token


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_http_port_checks_health_over_tls_and_guards_reports_like_the_job_service(
        secured: Secured, vision_job: str) -> None:
    status, body = _get(f"http://{secured.http}/healthz")
    assert status == 200 and '"ok"' in body  # its health check reaches the JobService over TLS
    report = f"http://{secured.http}/jobs/{vision_job}/report"
    assert _get(report)[0] == 401 and _get(report, "not-a-listed-token")[0] == 401
    status, body = _get(report, TOKENS["audio"])
    assert status == 403 and "another project" in body
    for who in ("vision", "admin"):
        status, body = _get(report, TOKENS[who])
        assert status == 200 and vision_job in body


def test_another_projects_job_is_denied_and_unlisted(secured: Secured, vision_job: str) -> None:
    with secured.client("audio") as audio:
        with pytest.raises(PermissionDeniedError, match="another project"):
            audio.job(vision_job)
        with pytest.raises(PermissionDeniedError):
            list(audio.calls.watch(vision_job))
        with pytest.raises(PermissionDeniedError):
            audio.calls.cancel(vision_job)
        assert vision_job not in {j.id for j in audio.jobs()}
    with secured.client("vision") as vision, secured.client("admin") as admin:
        assert vision_job in {j.id for j in vision.jobs()}
        assert admin.job(vision_job).state is JobState.SUCCEEDED  # an admin sees every project's jobs


def test_paths_outside_the_projects_roots_are_denied_with_nothing_written(secured: Secured) -> None:
    audio_root = secured.home / "audio"
    (audio_root / "linked-model").symlink_to(DEMO_MODEL)  # a symlink out of the root
    mixed = audio_root / "mixed-model"  # a directory in the root whose weights lie outside it
    mixed.mkdir()
    for entry in DEMO_MODEL.iterdir():
        (mixed / entry.name).symlink_to(entry)
    out = audio_root / "out"
    with secured.client("audio") as audio:
        for model in (DEMO_MODEL, audio_root / "linked-model", mixed):
            with pytest.raises(PermissionDeniedError, match="outside the roots of project audio"):
                audio.submit(make_request(out, method=Method.RTN, calibrate=False, model=model))
        with pytest.raises(PermissionDeniedError, match="output path"):
            audio.submit(make_request(secured.home / "vision" / "elsewhere", method=Method.RTN, calibrate=False,
                                      model=mixed))
        assert audio.jobs() == []
    assert not out.exists() and not (secured.home / "vision" / "elsewhere").exists()


def test_limits_are_resource_exhausted(secured: Secured) -> None:
    batch_root = secured.home / "batch"
    big = batch_root / "big-model"
    big.mkdir()
    for entry in DEMO_MODEL.iterdir():
        if entry.suffix != ".safetensors":
            (big / entry.name).write_bytes(entry.read_bytes())
    with open(big / "model.safetensors", "wb") as f:
        f.truncate(MODEL_BYTES + 4096)  # sparse: over the limit without costing the disk
    with secured.client("batch") as batch:
        with pytest.raises(ResourceExhaustedError, match="bytes of safetensors; the limit is"):
            batch.submit(make_request(batch_root / "big-out", method=Method.RTN, calibrate=False, model=big))
        with pytest.raises(ResourceExhaustedError):
            batch.calls.submit(job_pb2.QuantizeJob(model_path="m" * (128 * 1024)))  # over max_request_bytes
        rtn = make_request(batch_root / "wide", method=Method.RTN, calibrate=False)
        with pytest.raises(ResourceExhaustedError, match="asks for 3 solver replicas; the limit per job is 2"):
            batch.submit(dataclasses.replace(rtn, resources=Resources(gpus=3)))
        with pytest.raises(BitsmithError, match=r"FAILED_PRECONDITION: .* 2 solver replicas; the cluster has 1"):
            batch.submit(dataclasses.replace(rtn, resources=Resources(gpus=2)))  # within the limit, but never free

        # The client's one allowed job, held in the queue: written to the store the coordinator reads, as
        # no job of the demo model runs long enough to be sure it is still running at the next submit.
        spec = make_request(batch_root / "held", method=Method.RTN, calibrate=False).to_proto()
        store = JobStore(secured.home / "jobs.sqlite")
        held, _ = store.create(spec, owner="batch-bot", project="batch")
        store.close()
        with pytest.raises(ResourceExhaustedError, match="batch-bot has 1 queued or running jobs; the limit is 1"):
            batch.submit(make_request(batch_root / "second", method=Method.RTN, calibrate=False))
        assert batch.job(held.job_id).cancel().state is JobState.CANCELLED
        second = batch.submit(make_request(batch_root / "second", method=Method.RTN, calibrate=False)).wait(timeout=120)
        assert second.state is JobState.SUCCEEDED, second.error
    assert not (batch_root / "big-out").exists()


def test_a_plaintext_client_cannot_reach_the_tls_server(secured: Secured) -> None:
    with pytest.raises(ServiceUnavailableError):
        open_channel(secured.address, connect_timeout=2)
    with pytest.raises(ServiceUnavailableError, match="over TLS"):
        open_channel(secured.address, connect_timeout=2, tls=ClientTls())  # not trusting the test CA
    with pytest.raises(ServiceUnavailableError, match="over TLS"):  # a certificate for another name
        open_channel(secured.address, connect_timeout=2, tls=ClientTls(ca=secured.pki / "ca.pem", server_name="other"))
    open_channel(secured.address, connect_timeout=5, tls=ClientTls(ca=secured.pki / "ca.pem", server_name="localhost")
                 ).close()


def _empty_discard(channel: grpc.Channel) -> grpc.StatusCode:
    """The status of a do-nothing call to the packer: OK once the caller is past the door."""
    try:
        packer_pb2_grpc.PackerServiceStub(channel).Discard(packer_pb2.DiscardRequest(), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()
    return grpc.StatusCode.OK


def test_workers_refuse_callers_without_the_client_certificate(secured: Secured) -> None:
    worker = secured.addresses[Role.PACKER]
    with pytest.raises(ServiceUnavailableError):  # TLS, but no client certificate: the handshake fails
        open_channel(worker, connect_timeout=2, tls=secured.tls, token=TOKENS["admin"])
    coordinator_tls = ClientTls(ca=secured.pki / "ca.pem", cert=secured.pki / "coordinator.pem",
                                key=secured.pki / "coordinator.key")
    assert _empty_discard(open_channel(worker, connect_timeout=5, tls=coordinator_tls)) == grpc.StatusCode.OK


def test_without_tls_workers_take_only_the_service_token(tmp_path: Path) -> None:
    (tmp_path / "service-token").write_text("service-secret\n")
    path = tmp_path / "security.yaml"
    path.write_text(yaml.safe_dump({"service_token_file": "service-token",
                                    "tokens": [_grant("vision", [tmp_path])]}))
    config = SecurityConfig.load(path)
    server, port = start_service(Role.PACKER, "127.0.0.1:0", tmp_path / "store", security=config)
    address = f"127.0.0.1:{port}"
    try:
        for token in (None, TOKENS["vision"]):  # a client's token is not the service's
            assert _empty_discard(open_channel(address, token=token)) == grpc.StatusCode.UNAUTHENTICATED
        assert _empty_discard(open_channel(address, token="service-secret")) == grpc.StatusCode.OK
    finally:
        server.stop(grace=None).wait()


def test_the_service_keeps_serving_after_refusals(secured: Secured, vision_job: str) -> None:
    with secured.client("vision") as client:
        assert client.job(vision_job).state is JobState.SUCCEEDED
        assert vision_job in {j.id for j in client.jobs()}


@pytest.mark.parametrize(("config", "message"), [
    ({"tokens": [{"sha256": "plaintext-token", "client": "c", "project": "p"}]}, r"tokens\[0\].sha256"),
    ({"tls": {"key": "k"}}, r"tls.cert: is required"),
    ({"limits": {"max_jobs_per_client": 0}}, r"limits.max_jobs_per_client: must be a positive integer"),
    ({"limit": {}}, r"unknown keys \['limit'\]"),
    ({"tokens": [{"sha256": "0" * 64, "client": "c", "project": "p"}]}, r"workers would take anyone's calls"),
])
def test_config_errors_name_the_key(tmp_path: Path, config: dict[str, object], message: str) -> None:
    path = tmp_path / "security.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=message):
        SecurityConfig.load(path)


def test_the_environment_names_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BITSMITH_SECURITY", raising=False)
    assert SecurityConfig.from_env() is None
    path = tmp_path / "security.yaml"
    path.write_text(yaml.safe_dump({"limits": {"max_model_bytes": 1000}}))
    monkeypatch.setenv("BITSMITH_SECURITY", str(path))
    config = SecurityConfig.from_env()
    assert config is not None and config.limits.max_model_bytes == 1000 and config.tls is None
