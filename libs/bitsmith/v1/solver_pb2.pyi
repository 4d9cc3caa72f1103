from bitsmith.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SolveRequest(_message.Message):
    __slots__ = ("job_id", "block", "prefix", "stats", "method", "scheme", "gptq", "ggml", "model_path", "fp8")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    GPTQ_FIELD_NUMBER: _ClassVar[int]
    GGML_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    FP8_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    block: int
    prefix: str
    stats: _containers.RepeatedCompositeFieldContainer[_common_pb2.LinearStats]
    method: _common_pb2.Method
    scheme: _common_pb2.QuantScheme
    gptq: _common_pb2.GPTQOptions
    ggml: _common_pb2.GGMLScheme
    model_path: str
    fp8: _common_pb2.FP8Scheme
    def __init__(self, job_id: _Optional[str] = ..., block: _Optional[int] = ..., prefix: _Optional[str] = ..., stats: _Optional[_Iterable[_Union[_common_pb2.LinearStats, _Mapping]]] = ..., method: _Optional[_Union[_common_pb2.Method, str]] = ..., scheme: _Optional[_Union[_common_pb2.QuantScheme, _Mapping]] = ..., gptq: _Optional[_Union[_common_pb2.GPTQOptions, _Mapping]] = ..., ggml: _Optional[_Union[_common_pb2.GGMLScheme, _Mapping]] = ..., model_path: _Optional[str] = ..., fp8: _Optional[_Union[_common_pb2.FP8Scheme, _Mapping]] = ...) -> None: ...

class SolvedLinear(_message.Message):
    __slots__ = ("quantized", "error", "rtn_error", "damp_percent", "weight_energy")
    QUANTIZED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RTN_ERROR_FIELD_NUMBER: _ClassVar[int]
    DAMP_PERCENT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_ENERGY_FIELD_NUMBER: _ClassVar[int]
    quantized: _common_pb2.QuantizedRef
    error: float
    rtn_error: float
    damp_percent: float
    weight_energy: float
    def __init__(self, quantized: _Optional[_Union[_common_pb2.QuantizedRef, _Mapping]] = ..., error: _Optional[float] = ..., rtn_error: _Optional[float] = ..., damp_percent: _Optional[float] = ..., weight_energy: _Optional[float] = ...) -> None: ...

class SolveResponse(_message.Message):
    __slots__ = ("solved", "usage")
    SOLVED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    solved: _containers.RepeatedCompositeFieldContainer[SolvedLinear]
    usage: _common_pb2.ResourceUsage
    def __init__(self, solved: _Optional[_Iterable[_Union[SolvedLinear, _Mapping]]] = ..., usage: _Optional[_Union[_common_pb2.ResourceUsage, _Mapping]] = ...) -> None: ...
