"""PackerService over `bitsmith.formats` and `bitsmith.manifest`.

Pack writes into a staging directory beside the output and returns it; Publish adds the job's
metrics to the manifest and renames the staging directory into place; Discard removes it. Only
staging directories (by their name) are ever published or removed, so a request cannot make the
packer move or delete anything else. Each Pack logs its seconds split into reading the solved
weights, writing the format and writing the manifest, the three costs of a job's last step.

Two things keep that step short. The server imports what writing needs (torch, the formats, the
transformers model code: about 10 s on a GPU host) as it starts, before it serves, rather than in a
job's first Pack. Not on a thread beside serving: services that share a process (a local stack) would
import transformers from two threads at once, and its lazy imports are not safe against that (a
calibrator's Plan failed with "cannot import name 'AutoConfig'" so). And each file the
writer finishes is hashed for the manifest on worker threads while the writer goes on
(`bitsmith.formats.base.hashing_written_files`), instead of read again afterwards.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from bitsmith.errors import ConfigError
from bitsmith.formats import get_format, preload
from bitsmith.formats.base import PARTIAL_MARKER, discard, hashing_written_files, publish, stage, staging_dirs
from bitsmith.manifest import update_manifest, write_manifest
from bitsmith.rpc.convert import (
    format_from_proto,
    format_to_proto,
    gptq_from_proto,
    quantized_ref_from_proto,
    tensor_ref_from_proto,
    usage_to_proto,
)
from bitsmith.rpc.server import ServiceBinding
from bitsmith.rpc.server import create_server as _create_server
from bitsmith.store import ArtifactStore
from bitsmith.telemetry import current_trace_id
from bitsmith.v1 import common_pb2, packer_pb2, packer_pb2_grpc
from google.protobuf.json_format import MessageToDict

log = logging.getLogger("bitsmith.packer")


def _staging(path: str) -> Path:
    staging = Path(path)
    if not staging.is_absolute() or not staging.name.startswith(".") or PARTIAL_MARKER not in staging.name:
        raise ConfigError(f"{path!r} is not a staging directory of the packer")
    return staging


def _preload() -> None:
    """`bitsmith.formats.preload`, logging the formats it could not import (their first Pack raises the error
    with its context); any other failure only leaves the imports to the first Pack, so it is logged, not raised."""
    try:
        missing = preload()
    except Exception:
        log.warning("could not import the formats ahead of the first Pack", exc_info=True)
        return
    if missing:
        log.info("formats not importable on this host", extra={"formats": {f.value: e for f, e in missing.items()}})


class Packer(packer_pb2_grpc.PackerServiceServicer):
    def __init__(self, store: ArtifactStore) -> None:
        self._store = store

    def Pack(self, request: packer_pb2.PackRequest, context: grpc.ServicerContext) -> packer_pb2.PackResponse:
        if not request.out_path or not Path(request.out_path).is_absolute():
            raise ConfigError(f"the output path must be absolute, got {request.out_path!r}")
        fmt = format_from_proto(request.format.format)
        handler = get_format(fmt)
        started = time.perf_counter()
        # Every solved linear is read and its sha256 checked: on worker threads (hashlib and file reads
        # release the GIL), since an 8B model's 224 weights are 7 GB of codes.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="bitsmith-read") as pool:
            solved = pool.map(lambda q: self._store.get_quantized(quantized_ref_from_proto(q)), request.quantized)
            quantized = {q.name: weight for q, weight in zip(request.quantized, solved, strict=True)}
        dense = {t.name: self._store.get_tensor(tensor_ref_from_proto(t.tensor)) for t in request.dense}
        out = Path(request.out_path)
        staging = stage(out)
        seconds = {"read": time.perf_counter() - started}
        try:
            with hashing_written_files() as written:
                handler.write(staging, source_model_dir=Path(request.model_path), quantized=quantized,
                              options=gptq_from_proto(request.recipe.gptq), variant=request.format.variant or None,
                              dense=dense)
                seconds["write"] = time.perf_counter() - started - seconds["read"]
                manifest = write_manifest(
                    staging, format=fmt, recipe=MessageToDict(request.recipe, preserving_proto_field_name=True),
                    trace_id=current_trace_id(), written=written,
                )
        except BaseException:
            discard(staging)
            raise
        seconds["manifest"] = time.perf_counter() - started - seconds["read"] - seconds["write"]
        log.info("packer call done", extra={"rpc": "Pack", "format": fmt.value, "linears": len(quantized),
                                            "seconds": round(time.perf_counter() - started, 4),
                                            **{f"{step}_seconds": round(s, 4) for step, s in seconds.items()}})
        return packer_pb2.PackResponse(
            staging_path=str(staging),
            artifact=common_pb2.Artifact(
                format=request.format.format, variant=request.format.variant, path=str(out),
                bytes=sum(f.bytes for f in manifest.files), sha256=manifest.digest,
            ),
            usage=usage_to_proto(),
        )

    def Publish(self, request: packer_pb2.PublishRequest, context: grpc.ServicerContext) -> common_pb2.Artifact:
        staging = _staging(request.staging_path)
        metrics = {r.dataset: MessageToDict(r, preserving_proto_field_name=True) for r in request.metrics}
        diagnostics = (MessageToDict(request.diagnostics, preserving_proto_field_name=True)
                       if request.HasField("diagnostics") else None)
        manifest = update_manifest(staging, metrics=metrics, diagnostics=diagnostics,
                                   bits_per_weight=request.bits_per_weight or None)
        out = Path(request.out_path)
        publish(staging, out)
        return common_pb2.Artifact(
            format=format_to_proto(manifest.format), path=str(out),
            bytes=sum(f.bytes for f in manifest.files), sha256=manifest.digest,
        )

    def Discard(self, request: packer_pb2.DiscardRequest, context: grpc.ServicerContext
                ) -> packer_pb2.DiscardResponse:
        if request.out_path:
            for staging in staging_dirs(Path(request.out_path)):
                discard(staging)
        if request.staging_path:
            discard(_staging(request.staging_path))
        return packer_pb2.DiscardResponse()


def create_server(address: str, *, store_root: Path) -> tuple[grpc.Server, int]:
    _preload()
    binding = ServiceBinding.of(Packer(ArtifactStore(store_root)), packer_pb2, packer_pb2_grpc, "PackerService")
    return _create_server(address, [binding], component="packer")
