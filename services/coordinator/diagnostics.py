"""What a job learns about itself while it runs, for its report and its metrics.

The runner makes every worker call inside `JobRecorder.call`, which opens the call's span (the gRPC
client span nests under it, so the trace shows phase, block and service) and records the same
interval in the job's timeline. Phase totals and each service's busy seconds are sums over that
timeline, so the report's timeline, its phase table and the Prometheus phase histograms can never
disagree. Solvers report each linear's errors, the calibrator each block's held-out output error,
and every worker its peak memory; the recorder keeps them until `diagnostics()` is asked for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from bitsmith.telemetry import current_span_id, setup_tracing
from bitsmith.v1 import common_pb2


class JobRecorder:
    """Timeline, phases, per-service usage, layers and blocks of one job (thread-safe)."""

    def __init__(self) -> None:
        self._tracer = setup_tracing("bitsmith-coordinator").get_tracer("bitsmith.coordinator")
        self._started = time.monotonic()
        self._root = current_span_id()
        self._lock = threading.Lock()
        self._timeline: list[common_pb2.TimelineSpan] = []
        self._usage: dict[str, common_pb2.ResourceUsage] = {}
        self._layers: list[common_pb2.LayerDiagnostics] = []
        self._blocks: list[common_pb2.BlockDiagnostics] = []

    @contextmanager
    def call(self, phase: str, service: str, rpc: str, *, block: int = -1, worker: str = "") -> Iterator[None]:
        """Time one call to `service` (its replica at `worker`, where there are several) in `phase`, as a
        span of the job's trace and a timeline entry."""
        attributes: dict[str, str | int] = {"bitsmith.phase": phase, "bitsmith.block": block,
                                            "bitsmith.service": service, "bitsmith.worker": worker}
        with self._tracer.start_as_current_span(f"{phase} {rpc}", attributes=attributes):
            span_id = current_span_id()
            start = time.monotonic()
            try:
                yield
            finally:
                entry = common_pb2.TimelineSpan(
                    name=rpc, service=service, phase=phase, block=block, start_s=start - self._started,
                    duration_s=time.monotonic() - start, span_id=span_id, parent_id=self._root, worker=worker,
                )
                with self._lock:
                    self._timeline.append(entry)

    def usage(self, service: str, usage: common_pb2.ResourceUsage) -> None:
        """Keep the highest peaks a service reported (its peaks only grow within one process)."""
        with self._lock:
            held = self._usage.setdefault(service, common_pb2.ResourceUsage(device=usage.device))
            held.device = usage.device or held.device
            held.peak_host_bytes = max(held.peak_host_bytes, usage.peak_host_bytes)
            held.peak_device_bytes = max(held.peak_device_bytes, usage.peak_device_bytes)

    def layer(self, layer: common_pb2.LayerDiagnostics) -> None:
        with self._lock:
            self._layers.append(layer)

    def block(self, block: int, output_error: float, samples: int) -> None:
        with self._lock:
            self._blocks.append(common_pb2.BlockDiagnostics(block=block, output_error=output_error, samples=samples))

    def layers_of(self, target: str) -> list[common_pb2.LayerDiagnostics]:
        with self._lock:
            return [layer for layer in self._layers if layer.target == target]

    def diagnostics(self, trace_id: str = "") -> common_pb2.JobDiagnostics:
        """Everything recorded so far; phases and service busy time summed from the timeline."""
        with self._lock:
            timeline = list(self._timeline)
            phases: dict[str, common_pb2.PhaseTime] = {}
            busy: dict[str, float] = {}
            for span in timeline:
                phase = phases.setdefault(span.phase, common_pb2.PhaseTime(phase=span.phase))
                phase.seconds += span.duration_s
                phase.calls += 1
                busy[span.service] = busy.get(span.service, 0.0) + span.duration_s
            services = [common_pb2.ServiceUsage(service=name, usage=self._usage.get(name), busy_s=seconds)
                        for name, seconds in busy.items()]
            blocks = sorted(self._blocks, key=lambda b: b.block)
            return common_pb2.JobDiagnostics(
                layers=self._layers, blocks=blocks, phases=phases.values(),
                timeline=timeline, services=services, wall_s=time.monotonic() - self._started, trace_id=trace_id,
            )
