import datetime

from bitsmith.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QuantizeJob(_message.Message):
    __slots__ = ("model_path", "recipe", "calibration", "output", "eval", "client_request_id", "resources")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    recipe: _common_pb2.Recipe
    calibration: _common_pb2.CalibrationSpec
    output: _common_pb2.OutputSpec
    eval: _common_pb2.EvalSpec
    client_request_id: str
    resources: JobResources
    def __init__(self, model_path: _Optional[str] = ..., recipe: _Optional[_Union[_common_pb2.Recipe, _Mapping]] = ..., calibration: _Optional[_Union[_common_pb2.CalibrationSpec, _Mapping]] = ..., output: _Optional[_Union[_common_pb2.OutputSpec, _Mapping]] = ..., eval: _Optional[_Union[_common_pb2.EvalSpec, _Mapping]] = ..., client_request_id: _Optional[str] = ..., resources: _Optional[_Union[JobResources, _Mapping]] = ...) -> None: ...

class JobResources(_message.Message):
    __slots__ = ("gpus", "host_memory_bytes", "node_label")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    HOST_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NODE_LABEL_FIELD_NUMBER: _ClassVar[int]
    gpus: int
    host_memory_bytes: int
    node_label: str
    def __init__(self, gpus: _Optional[int] = ..., host_memory_bytes: _Optional[int] = ..., node_label: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "spec", "state", "created_at", "started_at", "finished_at", "error", "progress", "artifacts", "metrics", "trace_id", "diagnostics", "owner", "project", "solvers")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    SOLVERS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: QuantizeJob
    state: _common_pb2.JobState
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    error: str
    progress: _common_pb2.ProgressEvent
    artifacts: _containers.RepeatedCompositeFieldContainer[_common_pb2.Artifact]
    metrics: _containers.RepeatedCompositeFieldContainer[_common_pb2.EvalResult]
    trace_id: str
    diagnostics: _common_pb2.JobDiagnostics
    owner: str
    project: str
    solvers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[QuantizeJob, _Mapping]] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., progress: _Optional[_Union[_common_pb2.ProgressEvent, _Mapping]] = ..., artifacts: _Optional[_Iterable[_Union[_common_pb2.Artifact, _Mapping]]] = ..., metrics: _Optional[_Iterable[_Union[_common_pb2.EvalResult, _Mapping]]] = ..., trace_id: _Optional[str] = ..., diagnostics: _Optional[_Union[_common_pb2.JobDiagnostics, _Mapping]] = ..., owner: _Optional[str] = ..., project: _Optional[str] = ..., solvers: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: QuantizeJob
    def __init__(self, job: _Optional[_Union[QuantizeJob, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_sequence")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_sequence: int
    def __init__(self, job_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("states", "limit")
    STATES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[_common_pb2.JobState]
    limit: int
    def __init__(self, states: _Optional[_Iterable[_Union[_common_pb2.JobState, str]]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...
