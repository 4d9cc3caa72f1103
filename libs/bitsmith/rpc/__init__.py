"""gRPC glue and the Python SDK: the only package of the library that imports grpc.

The SDK is what this package exports: `Client` submits jobs described by typed dataclasses
(`QuantizeRequest` and its parts, in `request`) and returns `Job`s (in `job`) to watch, wait on and
cancel. Under it, `server` builds servers with health, reflection, error mapping and tracing; `status`
maps `BitsmithError`s to status codes; `convert` maps wire messages to library types; `client` opens
channels with deadlines and tracing; `discovery` finds the stack `bitsmith up` left running.

>>> from bitsmith.rpc import Calibration, Client                     # doctest: +SKIP
>>> with Client() as client:                                          # doctest: +SKIP
...     job = client.quantize("model/", out="out/q", calibration=Calibration(files=["calib.txt"]))
...     for event in job.watch():
...         print(event.phase, event.step, event.total_steps)
...     print(job.wait().artifacts)
"""

from bitsmith.recipes import ModuleOverride, Recipe
from bitsmith.rpc.client import Client, JobServiceCalls
from bitsmith.rpc.job import Artifact, EvalResult, Job, JobFailedError, JobState, ProgressEvent
from bitsmith.rpc.request import (
    Calibration,
    CalibrationMode,
    CheckpointFormat,
    Evaluation,
    OutputFormat,
    QualityGate,
    QuantizeRequest,
    Resources,
)
from bitsmith.schemes import Format, GPTQOptions, Method, QuantScheme

__all__ = [
    "Artifact",
    "Calibration",
    "CalibrationMode",
    "CheckpointFormat",
    "Client",
    "EvalResult",
    "Evaluation",
    "Format",
    "GPTQOptions",
    "Job",
    "JobFailedError",
    "JobServiceCalls",
    "JobState",
    "Method",
    "ModuleOverride",
    "OutputFormat",
    "ProgressEvent",
    "QualityGate",
    "QuantScheme",
    "QuantizeRequest",
    "Recipe",
    "Resources",
]
