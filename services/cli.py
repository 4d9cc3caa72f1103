"""The `bitsmith` command line: quantize, eval, serve, up/down, jobs, report.

Thin by design: it builds the job's `QuantizeRequest` from flags, talks to a JobService through the
SDK (`bitsmith.rpc`; starting an embedded stack when no --server is given and none runs), and renders
progress with rich. `--json` makes the last line of stdout one JSON object for scripts. A secured
stack takes `--security FILE` on `serve` and `up`; its clients `--token` and `--ca` (docs/security.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitsmith.devices import AUTO, MatmulPrecision
from bitsmith.errors import BitsmithError, ConfigError
from bitsmith.recipes import Recipe
from bitsmith.rpc.request import Calibration, CheckpointFormat, Evaluation, OutputFormat, QuantizeRequest, Resources
from bitsmith.runtimes import Target
from bitsmith.schemes import PER_CHANNEL, Format, FP8Scheme, GPTQOptions, GridSearch, Method, QuantScheme
from bitsmith_services.registry import Activations, Role, ServiceOptions
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from bitsmith.rpc.client import Client
    from bitsmith.rpc.job import EvalResult, Job
    from bitsmith.rpc.security import SecurityConfig

err = Console(stderr=True)


RECIPE_FLAGS = ("method", "bits", "group_size", "sym", "act_order", "static_groups", "mse", "damp_percent",
                "no_true_sequential", "asymmetric_calibration", "fp8_per_tensor", "fp8_static_activations")
"""Flags that build a recipe; a --recipe file is the whole recipe, so they are refused beside it."""


def _recipe(args: argparse.Namespace) -> Recipe:
    """The job's recipe: the --recipe file, or one built from the flags (defaults where unset)."""
    # A store-true flag is unset at False; --[no-]act-order / --[no-]static-groups only at None.
    given = [name for name in RECIPE_FLAGS if getattr(args, name) is not None
             and (getattr(args, name) is not False or name in ("act_order", "static_groups"))]
    if args.recipe:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ConfigError(f"--recipe holds the method, scheme and options; drop {flags}")
        return Recipe.from_yaml(args.recipe)
    defaults = Recipe()
    return Recipe(
        method=Method(args.method) if args.method else defaults.method,
        scheme=QuantScheme(bits=defaults.scheme.bits if args.bits is None else args.bits,
                           group_size=defaults.scheme.group_size if args.group_size is None else args.group_size,
                           sym=args.sym),
        gptq=GPTQOptions(damp_percent=defaults.gptq.damp_percent if args.damp_percent is None else args.damp_percent,
                         act_order=defaults.gptq.act_order if args.act_order is None else args.act_order,
                         static_groups=(defaults.gptq.static_groups if args.static_groups is None
                                        else args.static_groups),
                         true_sequential=not args.no_true_sequential,
                         asymmetric_calibration=args.asymmetric_calibration,
                         grid_search=GridSearch() if args.mse else None),
        fp8=FP8Scheme(per_channel=not args.fp8_per_tensor, static_activations=args.fp8_static_activations),
    )


def _output_format(text: str) -> OutputFormat:
    """``gguf:Q4_K_M`` → GGUF with that mix; a bare name has no variant."""
    try:
        return OutputFormat.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _request(args: argparse.Namespace) -> QuantizeRequest:
    """The job the flags describe (checked before anything connects)."""
    return QuantizeRequest(
        model=args.model, out=args.out, recipe=_recipe(args),
        calibration=Calibration(files=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                                mode=args.calibration_mode, holdout_samples=args.holdout_samples),
        formats=args.format or (OutputFormat(format=Format.GPTQ),),
        evaluation=Evaluation(files=args.eval, seq_len=args.eval_seq_len) if args.eval else None,
        request_id=args.request_id, checkpoint_format=args.checkpoint_format,
        resources=Resources(gpus=args.gpus, host_memory_bytes=args.host_memory, node_label=args.node_label),
    )


def _follow(job: Job, quiet: bool) -> None:
    """Render the job's progress events as a progress bar until it ends."""
    with Progress(TextColumn("[bold]{task.fields[phase]:<9}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=err, disable=quiet) as bar:
        task = bar.add_task("", total=None, phase="queued")
        for event in job.watch():
            bar.update(task, completed=event.step, total=event.total_steps or None, phase=event.phase,
                       description=event.message[:70])


def _metrics(results: Sequence[EvalResult]) -> dict[str, Any]:
    """Evaluation results by dataset, without the measures that were not taken."""
    return {r.dataset: {k: v for k, v in r.as_dict().items() if k != "dataset"} for r in results}


def _job_summary(job: Job) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "state": job.state.value,
        "artifacts": [{"format": a.format.value, "variant": a.variant, "path": str(a.path), "bytes": a.bytes,
                       "sha256": a.sha256, "bits_per_weight": a.bits_per_weight, "metrics": _metrics(a.metrics)}
                      for a in job.artifacts],
        "metrics": _metrics(job.metrics),
        "trace_id": job.trace_id,
        "error": job.error or "",
    }


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"job {summary['job_id']}: {summary['state']}")
    for col in ("artifact", "bits/weight", "dataset", "ppl", "reference ppl", "KL", "top-1"):
        table.add_column(col)
    for a in summary["artifacts"]:
        name = a["format"] + (f":{a['variant']}" if a["format"] == "gguf" and a["variant"] else "")
        bits = f"{a['bits_per_weight']:.3f}" if a["bits_per_weight"] else ""
        for row, (dataset, m) in enumerate(a["metrics"].items()):
            table.add_row(name if row == 0 else "", bits if row == 0 else "", Path(dataset).name, f"{m['ppl']:.3f}",
                          f"{m.get('reference_ppl', float('nan')):.3f}", f"{m.get('kl', float('nan')):.5f}",
                          f"{m.get('top1', float('nan')):.4f}")
    if table.row_count:
        err.print(table)
    for a in summary["artifacts"]:
        err.print(f"artifact [bold]{a['format']}[/]: {a['path']} ({a['bytes']:,} bytes, sha256 {a['sha256'][:16]}…)")
    if summary["error"]:
        err.print(f"[red]error:[/] {summary['error']}")


def _client(args: argparse.Namespace, address: str | None) -> Client:
    """The SDK client the flags ask for: --token as the bearer token, TLS verified with --ca when given."""
    from bitsmith.rpc.client import Client
    from bitsmith.rpc.security import ClientTls

    return Client(address, token=args.token or None, tls=ClientTls(ca=Path(args.ca)) if args.ca else None)


def _security(args: argparse.Namespace) -> SecurityConfig | None:
    """The --security file (default $BITSMITH_SECURITY), loaded and checked; None without one."""
    from bitsmith.rpc.security import SecurityConfig

    return SecurityConfig.load(args.security) if args.security else None


def _add_worker_options(parser: argparse.ArgumentParser) -> None:
    """How worker services compute: `serve`'s own, or those of the workers a coordinator starts on Ray
    (`serve coordinator`, `up`, the embedded stack of `quantize`)."""
    parser.add_argument(
        "--device", default=AUTO,
        help="calibrator, solver: where to compute: auto (CUDA when torch sees a GPU, else cpu), cpu, cuda, cuda:N; "
             "the calibrator holds one decoder block on it at a time")
    parser.add_argument(
        "--matmul-precision", choices=[p.value for p in MatmulPrecision],
        help="calibrator: high (float32 with TensorFloat-32 products on a GPU, the default: several times faster "
             "than exact), highest (exact float32) or bfloat16 (the block forwards in bfloat16, as peer tools "
             "calibrate: about 3x faster again on a GPU, half the activation memory)")
    parser.add_argument(
        "--activations", choices=[a.value for a in Activations], default=Activations.STORE.value,
        help="calibrator: where activations wait between blocks: store (any replica can continue), host (this "
             "process's memory; no per-block write of the calibration set) or device (its GPU's memory; no copies "
             "either, what a GPU calibrator wants where four calibration sets fit)")


def _worker_options(args: argparse.Namespace) -> ServiceOptions:
    return ServiceOptions(device=args.device, activations=Activations(args.activations),
                          **({"matmul_precision": MatmulPrecision(args.matmul_precision)}
                             if args.matmul_precision else {}))


def cmd_quantize(args: argparse.Namespace) -> int:
    from bitsmith.rpc.discovery import default_home, running_stack
    from bitsmith_services.stack import LocalStack

    request = _request(args)
    with ExitStack() as stack:
        address = args.server or running_stack(default_home())
        options = _worker_options(args)
        if address is None:
            err.print("[dim]starting an embedded bitsmith stack (local Ray + gRPC services)…[/]")
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bitsmith-")))
            address = stack.enter_context(LocalStack(home=home, options=options)).address
        elif options != ServiceOptions():
            raise ConfigError(f"the stack at {address} computes as it was started: --device, --activations and "
                              "--matmul-precision are for the embedded stack (or for `bitsmith up`)")
        client = stack.enter_context(_client(args, address))
        job = client.submit(request)
        err.print(f"job [bold]{job.id}[/] submitted to {address}")
        _follow(job, args.json)
        summary = _job_summary(job)
    _print_summary(summary)
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["state"] == "succeeded" else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from bitsmith.runtimes import evaluate_path

    results = evaluate_path(Path(args.path), [Path(f) for f in args.data], seq_len=args.seq_len,
                            reference=Path(args.reference) if args.reference else None,
                            target=Target(args.target) if args.target else None)
    for r in results:
        line = f"{r.dataset}: ppl {r.ppl:.4f} over {r.tokens} predictions"
        if r.kl is not None:
            line += f", KL {r.kl:.6f}, top-1 {r.top1:.4f}"
        err.print(line)
    if args.json:
        if len(results) == 1:
            out: dict[str, Any] = results[0].as_dict()
            out.pop("dataset")
        else:
            out = {"datasets": [r.as_dict() for r in results]}
        print(json.dumps(out))
    return 0


STOP_POLL_S = 0.5


def _serve_until_stopped() -> None:
    """Return once SIGTERM or SIGINT arrives.

    The handlers are installed here, once the service is up: starting a coordinator's local Ray puts in
    Ray's own (which exit with the signal's number). The wait is in slices: Python runs signal handlers in
    the main thread only, and a main thread blocked on a lock without a timeout never runs one the kernel
    delivered to another of the process's threads (a service has many: gRPC's, hashing workers, CUDA's).
    A calibrator on a GPU once ignored SIGTERM so.
    """
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(STOP_POLL_S):
        pass


def cmd_serve(args: argparse.Namespace) -> int:
    from bitsmith.logs import configure_json_logging
    from bitsmith.rpc.discovery import default_home, write_stack_file
    from bitsmith_services.registry import start_service
    from bitsmith_services.stack import LocalStack, parse_services

    configure_json_logging()
    if args.service == "coordinator":
        home = Path(args.home) if args.home else default_home()
        with LocalStack(home=home, host=args.host, port=args.port, ray_address=args.ray_address,
                        services=parse_services(args.services), http_port=args.http_port,
                        max_concurrent_jobs=args.max_jobs, security=_security(args),
                        options=_worker_options(args)) as local:
            if args.write_stack_file:
                write_stack_file(home, local.address, local.http_address)
            print(local.address, flush=True)  # stdout is the gRPC address (scripts read it)
            logging.getLogger("bitsmith.coordinator").info(
                "serving", extra={"grpc": local.address, "http": local.http_address})
            _serve_until_stopped()
        return 0
    if not args.store:
        raise ConfigError(f"bitsmith serve {args.service} needs --store DIR (the artifact store it shares)")
    server, port = start_service(args.service, f"{args.host}:{args.port}", Path(args.store),
                                 options=_worker_options(args), security=_security(args))
    print(f"{args.host}:{port}", flush=True)
    _serve_until_stopped()
    server.stop(grace=5).wait()
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from bitsmith.rpc.discovery import default_home, running_stack, running_stack_http
    from bitsmith_services.stack import wait_until_serving

    home = default_home()
    address = running_stack(home)
    if address:
        print(address)
        return 0
    security = _security(args)  # checked here, so a bad file fails `up` itself rather than the stack it starts
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "stack.log", "ab")  # noqa: SIM115 - handed to the child process
    cmd = [sys.executable, "-m", "bitsmith_services.cli", "serve", "coordinator", "--port", str(args.port),
           "--http-port", str(args.http_port), "--home", str(home), "--write-stack-file"]
    if args.ray_address:
        cmd += ["--ray-address", args.ray_address]
    cmd += ["--device", args.device, "--activations", args.activations]
    if args.matmul_precision:
        cmd += ["--matmul-precision", args.matmul_precision]
    if args.security:
        cmd += ["--security", str(Path(args.security).resolve())]
    subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while (address := running_stack(home)) is None:
        if time.monotonic() > deadline:
            raise BitsmithError(f"the stack did not start; see {home / 'stack.log'}")
        time.sleep(0.5)
    wait_until_serving(address, timeout=60, tls=security.tls.client if security and security.tls else None)
    err.print(f"health, metrics and job reports at http://{running_stack_http(home)}")
    print(address)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from bitsmith.rpc.discovery import default_home
    from bitsmith_services.stack import stop_stack

    stopped = stop_stack(default_home())
    err.print("stopped" if stopped else "no bitsmith stack was running")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args, args.server) as client:
        if args.action == "list":
            jobs = client.jobs()
            if args.json:
                print(json.dumps([_job_summary(j) for j in jobs]))
                return 0
            table = Table("job", "state", "model", "phase", "error")
            for j in jobs:
                table.add_row(j.id, j.state.value, j.model.name, j.progress.phase if j.progress else "",
                              (j.error or "")[:60])
            err.print(table)
            return 0
        if not args.job_id:
            raise ConfigError(f"bitsmith jobs {args.action} needs a JOB_ID")
        job = client.job(args.job_id)
        if args.action == "watch":
            _follow(job, quiet=False)
        elif args.action == "cancel":
            job.cancel()
        summary = _job_summary(job)
    _print_summary(summary)
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Render the job report of a job (fetched from the server) or of an artifact directory (its manifest)."""
    from bitsmith.formats.base import write_file_atomic
    from bitsmith.report import ReportData, render_report

    target = Path(args.target)
    if target.is_dir():
        data, name = ReportData.from_artifact_dir(target), target.resolve().name
    elif target.exists() or "/" in args.target:
        raise ConfigError(f"{args.target} is neither an artifact directory nor a job id")
    else:
        with _client(args, args.server) as client:
            job = client.job(args.target)
        data, name = ReportData.from_job(job.proto), job.id
    out = Path(args.out) if args.out else Path.cwd() / f"{name}-report.html"
    write_file_atomic(out, render_report(data).encode())
    print(out)
    return 0


def _add_credentials(parser: argparse.ArgumentParser) -> None:
    """--token and --ca: how a client command proves itself to a secured stack and verifies it."""
    parser.add_argument("--token", default=os.environ.get("BITSMITH_TOKEN"),
                        help="bearer token for a stack that authenticates its callers (default: $BITSMITH_TOKEN)")
    parser.add_argument("--ca", metavar="FILE", default=os.environ.get("BITSMITH_CA"),
                        help="CA certificate (PEM) of a TLS stack: connect over TLS, verifying the server with it "
                             "(default: $BITSMITH_CA; none: plaintext)")


def _add_security(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--security", metavar="FILE", default=os.environ.get("BITSMITH_SECURITY"),
                        help="YAML security config: TLS, bearer tokens and projects, limits (default: "
                             "$BITSMITH_SECURITY; none: plaintext and open)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitsmith", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a checkpoint through the services")
    q.add_argument("model", help="Hugging Face checkpoint directory")
    q.add_argument("--recipe", metavar="FILE",
                   help="YAML recipe: default method and scheme, options, ordered per-module overrides "
                        "(replaces the method/scheme flags below)")
    q.add_argument("--method", choices=[m.value for m in Method], help=f"default {Recipe().method.value}")
    q.add_argument("--bits", type=int, help=f"default {QuantScheme().bits}")
    q.add_argument("--group-size", type=int, help=f"default {QuantScheme().group_size}; {PER_CHANNEL} for per-channel")
    q.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: columns by descending Hessian diagonal (default: on)")
    q.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: fix group grids before the solve, groups stay contiguous (default: on)")
    q.add_argument("--mse", action="store_true",
                   help="fit each group's grid to the clipped range with the least error (GPTQ and RTN)")
    q.add_argument("--damp-percent", type=float, help=f"GPTQ: default {GPTQOptions().damp_percent}")
    q.add_argument("--no-true-sequential", action="store_true", help="GPTQ: one capture per block")
    q.add_argument("--asymmetric-calibration", action="store_true",
                   help="GPTQ and AWQ: fit each linear to the float model's outputs from the quantized model's "
                        "inputs (runs the float model beside the quantized one; sequential mode)")
    q.add_argument("--fp8-per-tensor", action="store_true",
                   help="fp8: one weight scale per tensor (default: one per output channel)")
    q.add_argument("--fp8-static-activations", action="store_true",
                   help="fp8: one calibrated activation scale per tensor (needs --calib; default: per token at "
                        "run time)")
    q.add_argument("--calib", action="append", default=[], metavar="FILE", help="calibration text (repeatable)")
    q.add_argument("--samples", type=int, default=128)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--holdout-samples", type=int, metavar="N",
                   help="further calibration windows kept out of the statistics, on which the report measures "
                        "each block's output error (default: samples / 16, in 1..16; 0: none)")
    q.add_argument("--calibration-mode", choices=["sequential", "parallel"], default="sequential",
                   help="sequential: block i+1 calibrates on quantized block i's outputs; parallel: every block "
                        "on the float model's activations")
    q.add_argument("--format", action="append", type=_output_format, default=[], metavar="FORMAT[:VARIANT]",
                   help="output format, repeatable: gptq, awq, compressed-tensors (NVIDIA: vLLM/transformers), "
                        "onnx (ONNX Runtime on any CPU), mlx (Apple Silicon), gguf:MIX (llama.cpp; MIX is a "
                        "llama-quantize type such as Q4_K_M, Q8_0 or F16), modelopt and trtllm (TensorRT-LLM: "
                        "fp8 or 4-bit); several formats share one calibration")
    q.add_argument("--checkpoint-format", choices=[c.value for c in CheckpointFormat], default="auto",
                   help="auto: v1 for --sym (loads everywhere), v2 (true zeros) for asymmetric grids")
    q.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    q.add_argument("--eval", action="append", default=[], metavar="FILE", help="held-out text to evaluate on")
    q.add_argument("--eval-seq-len", type=int, default=512)
    q.add_argument("--gpus", type=int, default=1,
                   help="solver replicas (GPUs) the job's solves fan out over; the job waits until they are free")
    q.add_argument("--host-memory", type=int, metavar="BYTES",
                   help="calibrator host memory the job holds (default: estimated from the model and calibration)")
    q.add_argument("--node-label", metavar="LABEL",
                   help="run the job's solves only on nodes with this label (key=value, or a resource such as "
                        "accelerator_type:H100)")
    _add_worker_options(q)
    q.add_argument("--server", help="HOST:PORT of a JobService (default: a running `bitsmith up`, else embedded)")
    q.add_argument("--request-id", help="client request id: resubmitting it returns the same job")
    q.add_argument("--json", action="store_true", help="print the result as JSON on the last line of stdout")
    _add_credentials(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity / KL / top-1 of a checkpoint or an artifact")
    e.add_argument("path")
    e.add_argument("--data", action="append", required=True, metavar="FILE")
    e.add_argument("--reference", help="unquantized checkpoint for KL and top-1 agreement")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--target", choices=[t.value for t in Target],
                   help="the engine to run it on: cpu (torch on dequantized weights, ONNX Runtime, llama.cpp), apple "
                        "(mlx), nvidia (bitsmith's kernels, FP8 activations; their torch twins without a GPU); "
                        "default: the format's own")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("serve", help="run one service in the foreground")
    s.add_argument("service", choices=["coordinator", *(r.value for r in Role)])
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--http-port", type=int, default=0,
                   help="coordinator: port of its HTTP endpoint (/healthz, /metrics, /jobs/ID/report) on --host; "
                        "0 picks a free one")
    s.add_argument("--store", help="artifact store directory (worker services)")
    s.add_argument("--home", help="coordinator: job store and artifact store directory")
    s.add_argument("--ray-address", help="coordinator: join this Ray cluster instead of starting a local one")
    s.add_argument("--services", help="coordinator: role=host:port,... of running services, instead of Ray "
                                      "(solver=host:port once per solver replica)")
    s.add_argument("--max-jobs", type=int, metavar="N",
                   help="coordinator: jobs running at once at most (default: one per solver replica)")
    _add_worker_options(s)
    s.add_argument("--write-stack-file", action="store_true", help=argparse.SUPPRESS)
    _add_security(s)
    s.set_defaults(func=cmd_serve)

    u = sub.add_parser("up", help="start a long-running local stack in the background; prints its address")
    u.add_argument("--port", type=int, default=0)
    u.add_argument("--http-port", type=int, default=0,
                   help="port of the coordinator's HTTP endpoint (health, metrics, job reports); 0 picks a free one")
    u.add_argument("--ray-address")
    _add_worker_options(u)
    _add_security(u)
    u.set_defaults(func=cmd_up)
    d = sub.add_parser("down", help="stop the stack `bitsmith up` started")
    d.set_defaults(func=cmd_down)

    j = sub.add_parser("jobs", help="list, show, watch or cancel jobs")
    j.add_argument("action", choices=["list", "show", "watch", "cancel"])
    j.add_argument("job_id", nargs="?")
    j.add_argument("--server", help="HOST:PORT of a JobService (default: the running `bitsmith up`)")
    j.add_argument("--json", action="store_true")
    _add_credentials(j)
    j.set_defaults(func=cmd_jobs)

    r = sub.add_parser("report", help="write the HTML report of a job or of an artifact directory")
    r.add_argument("target", metavar="JOB_ID|ARTIFACT_DIR",
                   help="a job id (fetched from the server) or an artifact directory (read from its manifest)")
    r.add_argument("--out", metavar="FILE", help="where to write it (default: <job id or dir name>-report.html)")
    r.add_argument("--server", help="HOST:PORT of a JobService (default: the running `bitsmith up`)")
    _add_credentials(r)
    r.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return int(args.func(args))
    except BitsmithError as exc:
        err.print(f"[red]error:[/] {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
