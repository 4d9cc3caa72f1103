from bitsmith.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EvaluateRequest(_message.Message):
    __slots__ = ("artifact_path", "reference_model_path", "data_files", "seq_len")
    ARTIFACT_PATH_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FILES_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    artifact_path: str
    reference_model_path: str
    data_files: _containers.RepeatedScalarFieldContainer[str]
    seq_len: int
    def __init__(self, artifact_path: _Optional[str] = ..., reference_model_path: _Optional[str] = ..., data_files: _Optional[_Iterable[str]] = ..., seq_len: _Optional[int] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("results", "usage")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[_common_pb2.EvalResult]
    usage: _common_pb2.ResourceUsage
    def __init__(self, results: _Optional[_Iterable[_Union[_common_pb2.EvalResult, _Mapping]]] = ..., usage: _Optional[_Union[_common_pb2.ResourceUsage, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("artifact_path", "prompt", "max_new_tokens", "chunk_interval_ms")
    ARTIFACT_PATH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    artifact_path: str
    prompt: str
    max_new_tokens: int
    chunk_interval_ms: int
    def __init__(self, artifact_path: _Optional[str] = ..., prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., chunk_interval_ms: _Optional[int] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "stats")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    text: str
    stats: GenerateStats
    def __init__(self, text: _Optional[str] = ..., stats: _Optional[_Union[GenerateStats, _Mapping]] = ...) -> None: ...

class GenerateStats(_message.Message):
    __slots__ = ("prompt_tokens", "prompt_seconds", "decode_tokens", "decode_seconds", "generated_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    prompt_seconds: float
    decode_tokens: int
    decode_seconds: float
    generated_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., prompt_seconds: _Optional[float] = ..., decode_tokens: _Optional[int] = ..., decode_seconds: _Optional[float] = ..., generated_tokens: _Optional[int] = ...) -> None: ...
