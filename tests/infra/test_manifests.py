"""infra/ against the code it deploys: every file parses, every command it runs is one the `bitsmith` CLI
accepts, ports agree between containers, Services, probes and scrape annotations, images are targets
the Dockerfile builds, and the per-role Ray resources ask only for what some node offers.

Nothing here can start a container or a cluster; these checks are what a typo in a manifest breaks.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from bitsmith_services.cli import _parser
from bitsmith_services.coordinator.placement import RAY_RESOURCES_ENV, ActorResources, parse_role_resources
from bitsmith_services.registry import Role

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
STORE_MOUNT = "/mnt/bitsmith"


def yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> list[dict[str, Any]]:
    return [d for p in sorted((INFRA / "k8s").glob("*.yaml")) for d in yaml_docs(p)]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == kind}


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(owner name, pod spec) of every Deployment and every RayCluster group."""
    for name, d in by_kind("Deployment").items():
        yield name, d["spec"]["template"]["spec"]
    for name, rc in by_kind("RayCluster").items():
        yield f"{name}/head", rc["spec"]["headGroupSpec"]["template"]["spec"]
        for group in rc["spec"]["workerGroupSpecs"]:
            yield f"{name}/{group['groupName']}", group["template"]["spec"]


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """The command line as `bitsmith` parses it (argparse exits on anything it does not know)."""
    try:
        return _parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`bitsmith {shlex.join(argv)}` is not a valid command line") from exc


def dockerfile_stages() -> dict[str, dict[str, Any]]:
    """Each stage's name, base and JSON-form CMD/ENTRYPOINT/EXPOSE (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] = {}
    for line in text.splitlines():
        words = line.split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        instruction, rest = words[0].upper(), (words[1] if len(words) > 1 else "")
        if instruction == "FROM":
            base, _, name = rest.partition(" AS ")
            current = stages.setdefault(name.strip(), {"from": base.strip(), "expose": []})
        elif instruction in ("CMD", "ENTRYPOINT"):
            current[instruction.lower()] = json.loads(rest)
        elif instruction == "EXPOSE":
            current["expose"] += [int(p) for p in rest.split()]
    return stages


def resolved(stage: str, key: str) -> Any:
    """A stage's CMD or ENTRYPOINT, inherited from its base stages as Docker does."""
    stages = dockerfile_stages()
    while key not in stages[stage]:
        stage = stages[stage]["from"]
    return stages[stage][key]


def advertised(resources_param: str) -> dict[str, float]:
    """The custom resources of a KubeRay rayStartParams `resources` value ('"{\\"name\\": 1}"')."""
    return dict(json.loads(json.loads(resources_param)))


def test_every_yaml_file_parses() -> None:
    files = sorted(INFRA.rglob("*.yaml"))
    assert {p.relative_to(INFRA).as_posix() for p in files} >= {
        "ray/cluster.yaml", "k8s/raycluster.yaml", "k8s/coordinator.yaml", "k8s/pvc.yaml", "k8s/configmap.yaml",
        "otel/collector.yaml", "kustomization.yaml"}
    for path in files:
        assert yaml_docs(path), f"{path} holds no document"


def test_kubernetes_manifests_hold_the_expected_kinds() -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in k8s_objects()}
    assert {("RayCluster", "bitsmith"), ("Deployment", "bitsmith-coordinator"), ("Service", "bitsmith-coordinator"),
            ("PersistentVolumeClaim", "bitsmith-store"), ("ConfigMap", "bitsmith-config"),
            ("Deployment", "bitsmith-otel-collector"), ("Service", "bitsmith-otel-collector")} <= kinds
    kustomization = yaml_docs(INFRA / "kustomization.yaml")[0]
    listed = {INFRA / r for r in kustomization["resources"]}
    assert listed == set((INFRA / "k8s").glob("*.yaml")), "kustomization.yaml lists every manifest"
    assert [INFRA / f for g in kustomization["configMapGenerator"] for f in g["files"]] == [
        INFRA / "otel" / "collector.yaml"]


def test_bitsmith_images_are_dockerfile_targets_of_this_version() -> None:
    stages = dockerfile_stages()
    images = [c["image"] for _, spec in pod_specs() for c in spec["containers"]]
    images.append(yaml_docs(INFRA / "ray" / "cluster.yaml")[0]["docker"]["image"])
    images += [t["docker"]["worker_image"] for t in yaml_docs(INFRA / "ray" / "cluster.yaml")[0][
        "available_node_types"].values() if "docker" in t]
    ours = [i for i in images if i.startswith("bitsmith/")]
    assert len(ours) >= 5
    for image in ours:
        target, _, tag = image.removeprefix("bitsmith/").partition(":")
        assert target in stages, f"{image}: the Dockerfile has no target {target!r}"
        assert tag == VERSION, f"{image}: tag is not the package's version {VERSION}"


def test_coordinator_deployment_runs_a_real_command_on_the_ports_its_service_and_probes_use() -> None:
    deployment = by_kind("Deployment")["bitsmith-coordinator"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert resolved(container["image"].removeprefix("bitsmith/").split(":")[0], "entrypoint") == ["bitsmith"]
    args = parse_cli(container["args"])
    assert args.func.__name__ == "cmd_serve" and args.service == "coordinator"
    assert args.host == "0.0.0.0" and args.ray_address.startswith("ray://")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "http": args.http_port}

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz" and ports[get["port"]] == args.http_port
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == args.http_port

    service = by_kind("Service")["bitsmith-coordinator"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["name"]: ports[p["targetPort"]] for p in service["spec"]["ports"]} == ports

    home = Path(args.home)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(home.is_relative_to(m) for m in mounts), "the coordinator's home is on the shared volume"
    assert by_kind("ConfigMap")["bitsmith-config"]["data"]["BITSMITH_HOME"] == args.home


def test_the_coordinator_reaches_the_ray_head_through_its_client_port() -> None:
    (cluster_name,) = by_kind("RayCluster")
    head = by_kind("RayCluster")[cluster_name]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    (container,) = by_kind("Deployment")["bitsmith-coordinator"]["spec"]["template"]["spec"]["containers"]
    target = parse_cli(container["args"]).ray_address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    assert host == f"{cluster_name}-head-svc", "KubeRay names the head's Service <cluster>-head-svc"
    assert int(port) in {p["containerPort"] for p in head["ports"] if p["name"] == "client"}


def test_every_pod_mounts_the_shared_store_at_one_path_and_reads_the_settings() -> None:
    (claim,) = by_kind("PersistentVolumeClaim")
    assert "ReadWriteMany" in by_kind("PersistentVolumeClaim")[claim]["spec"]["accessModes"]
    for owner, spec in pod_specs():
        if owner == "bitsmith-otel-collector":
            continue
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts[STORE_MOUNT]]["persistentVolumeClaim"]["claimName"] == claim, owner
            assert {"name": "bitsmith-config"} in [e["configMapRef"] for e in container["envFrom"]], owner
            auth = {e["name"]: e for e in container["env"]}
            assert auth["RAY_AUTH_MODE"]["value"] == "token", owner
            assert auth["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "bitsmith-ray-auth", owner


def test_service_images_run_real_subcommands_on_the_ports_they_expose() -> None:
    stages = dockerfile_stages()
    services = {"coordinator", *(r.value for r in Role if r is not Role.RUNTIME_APPLE)}
    assert services <= stages.keys()
    for name in services:
        assert resolved(name, "entrypoint") == ["bitsmith"], name
        args = parse_cli(resolved(name, "cmd"))
        assert args.func.__name__ == "cmd_serve" and args.service == name, name
        assert args.host == "0.0.0.0", name
        assert sorted(stages[name]["expose"]) == sorted(p for p in (args.port, args.http_port) if p), name
        location = Path(args.home if name == "coordinator" else args.store)
        assert location.is_relative_to(STORE_MOUNT), f"{name} keeps its files off the shared volume"
    assert stages["solver"]["from"] == stages["calibrator"]["from"] == "cuda"
    assert stages["cuda"]["from"].startswith("${CUDA_IMAGE}") and "nvidia/cuda" in DOCKERFILE.read_text()


def test_dockerignore_keeps_what_the_image_build_copies() -> None:
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    copied = {w for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")
              for w in line.split()[1:-1] if not w.startswith("--")}
    assert copied, "the Dockerfile copies the sources"
    for path in copied:
        assert f"!{path.rstrip('/')}" in [e.rstrip("/") for e in ignore], f"{path} would be left out of the context"


def check_role_resources(spec: str, offered: list[dict[str, float]]) -> dict[Role, ActorResources]:
    """Every role's custom resources are offered by some node that also has the CPU/GPU it asks for."""
    roles = parse_role_resources(spec)
    assert set(roles) == set(Role), f"{RAY_RESOURCES_ENV} places every role"
    for role, wanted in roles.items():
        assert any(all(node.get(name, 0) >= n for name, n in wanted.amounts.items()) for node in offered), (
            f"no node offers what {role.value} asks for: {dict(wanted.amounts)}")
    return roles


def test_ray_cluster_config_places_every_role_on_a_node_type_that_offers_its_resources() -> None:
    config = yaml_docs(INFRA / "ray" / "cluster.yaml")[0]
    types = config["available_node_types"]
    assert config["head_node_type"] in types and types[config["head_node_type"]]["resources"]["CPU"] == 0
    command = next(c for c in config["head_start_ray_commands"] if "bitsmith serve" in c)
    env, _, cli = command.partition(" nohup bitsmith ")
    name, _, value = env.partition("=")
    assert name == RAY_RESOURCES_ENV
    roles = check_role_resources(shlex.split(value)[0], [t["resources"] for t in types.values()])
    assert all(roles[r].amounts.get("GPU") for r in (Role.CALIBRATOR, Role.SOLVER, Role.RUNTIME_NVIDIA)), (
        "the compute roles and the NVIDIA runtime get a GPU")
    args = parse_cli(shlex.split(cli.partition(" > ")[0]))
    assert args.service == "coordinator" and args.ray_address == "auto"
    assert Path(args.home).is_relative_to(STORE_MOUNT)
    for node_type in types.values():
        options = node_type.get("docker", {}).get("worker_run_options", []) + config["docker"]["run_options"]
        assert f"--volume {STORE_MOUNT}:{STORE_MOUNT}" in options


def test_raycluster_groups_offer_what_the_configmap_asks_for() -> None:
    (cluster,) = by_kind("RayCluster").values()
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    offered = []
    for group in groups:
        params = group["rayStartParams"]
        container = group["template"]["spec"]["containers"][0]
        cpus = float(params.get("num-cpus", container["resources"]["limits"]["cpu"]))
        gpus = float(params.get("num-gpus", container["resources"]["limits"].get("nvidia.com/gpu", 0)))
        assert gpus == float(container["resources"]["limits"].get("nvidia.com/gpu", 0)), "num-gpus is the pod's GPUs"
        offered.append({"CPU": cpus, "GPU": gpus, **advertised(params.get("resources", '"{}"'))})
    check_role_resources(by_kind("ConfigMap")["bitsmith-config"]["data"][RAY_RESOURCES_ENV], offered)


def test_otel_collector_receives_otlp_grpc_where_the_services_send_it() -> None:
    config = yaml_docs(INFRA / "otel" / "collector.yaml")[0]
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"] and {"debug", "otlp/backend"} <= set(pipeline["exporters"])
    assert config["exporters"]["otlp/backend"]["endpoint"] == "${env:OTEL_BACKEND_ENDPOINT}"
    grpc_port = int(config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rpartition(":")[2])
    endpoint = by_kind("ConfigMap")["bitsmith-config"]["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    host, _, port = endpoint.removeprefix("http://").rpartition(":")
    service = by_kind("Service")[host]
    (container,) = by_kind("Deployment")[host]["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (target,) = [p["targetPort"] for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert container_ports[target] == grpc_port
    assert "OTEL_BACKEND_ENDPOINT" in {e["name"] for e in container["env"]}


@pytest.mark.parametrize("spec", ['{"solver": {"GPU": 1}}', '{"solver": {"GPU": 1, "bitsmith_gpu_node": 1}}'])
def test_role_resources_become_ray_actor_options(spec: str) -> None:
    (resources,) = parse_role_resources(spec).values()
    options = resources.ray_options()
    assert options["num_gpus"] == 1 and options["num_cpus"] == 0
    assert "GPU" not in options["resources"], "Ray refuses GPU among custom resources"
