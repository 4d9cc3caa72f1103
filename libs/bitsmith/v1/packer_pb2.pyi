from bitsmith.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PackRequest(_message.Message):
    __slots__ = ("job_id", "model_path", "quantized", "format", "out_path", "recipe", "dense")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    OUT_PATH_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model_path: str
    quantized: _containers.RepeatedCompositeFieldContainer[_common_pb2.QuantizedRef]
    format: _common_pb2.OutputFormat
    out_path: str
    recipe: _common_pb2.Recipe
    dense: _containers.RepeatedCompositeFieldContainer[_common_pb2.NamedTensor]
    def __init__(self, job_id: _Optional[str] = ..., model_path: _Optional[str] = ..., quantized: _Optional[_Iterable[_Union[_common_pb2.QuantizedRef, _Mapping]]] = ..., format: _Optional[_Union[_common_pb2.OutputFormat, _Mapping]] = ..., out_path: _Optional[str] = ..., recipe: _Optional[_Union[_common_pb2.Recipe, _Mapping]] = ..., dense: _Optional[_Iterable[_Union[_common_pb2.NamedTensor, _Mapping]]] = ...) -> None: ...

class PackResponse(_message.Message):
    __slots__ = ("staging_path", "artifact", "usage")
    STAGING_PATH_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    staging_path: str
    artifact: _common_pb2.Artifact
    usage: _common_pb2.ResourceUsage
    def __init__(self, staging_path: _Optional[str] = ..., artifact: _Optional[_Union[_common_pb2.Artifact, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.ResourceUsage, _Mapping]] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("staging_path", "out_path", "metrics", "trace_id", "diagnostics", "bits_per_weight")
    STAGING_PATH_FIELD_NUMBER: _ClassVar[int]
    OUT_PATH_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    staging_path: str
    out_path: str
    metrics: _containers.RepeatedCompositeFieldContainer[_common_pb2.EvalResult]
    trace_id: str
    diagnostics: _common_pb2.JobDiagnostics
    bits_per_weight: float
    def __init__(self, staging_path: _Optional[str] = ..., out_path: _Optional[str] = ..., metrics: _Optional[_Iterable[_Union[_common_pb2.EvalResult, _Mapping]]] = ..., trace_id: _Optional[str] = ..., diagnostics: _Optional[_Union[_common_pb2.JobDiagnostics, _Mapping]] = ..., bits_per_weight: _Optional[float] = ...) -> None: ...

class DiscardRequest(_message.Message):
    __slots__ = ("staging_path", "out_path")
    STAGING_PATH_FIELD_NUMBER: _ClassVar[int]
    OUT_PATH_FIELD_NUMBER: _ClassVar[int]
    staging_path: str
    out_path: str
    def __init__(self, staging_path: _Optional[str] = ..., out_path: _Optional[str] = ...) -> None: ...

class DiscardResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
