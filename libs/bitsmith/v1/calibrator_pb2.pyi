from bitsmith.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PlanRequest(_message.Message):
    __slots__ = ("model_path", "recipe", "formats")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    recipe: _common_pb2.Recipe
    formats: _containers.RepeatedCompositeFieldContainer[_common_pb2.OutputFormat]
    def __init__(self, model_path: _Optional[str] = ..., recipe: _Optional[_Union[_common_pb2.Recipe, _Mapping]] = ..., formats: _Optional[_Iterable[_Union[_common_pb2.OutputFormat, _Mapping]]] = ...) -> None: ...

class LinearGroup(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class BlockPlan(_message.Message):
    __slots__ = ("prefix", "groups")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    groups: _containers.RepeatedCompositeFieldContainer[LinearGroup]
    def __init__(self, prefix: _Optional[str] = ..., groups: _Optional[_Iterable[_Union[LinearGroup, _Mapping]]] = ...) -> None: ...

class ModelPlan(_message.Message):
    __slots__ = ("architecture", "blocks")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    blocks: _containers.RepeatedCompositeFieldContainer[BlockPlan]
    def __init__(self, architecture: _Optional[str] = ..., blocks: _Optional[_Iterable[_Union[BlockPlan, _Mapping]]] = ...) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ("job_id", "model_path", "calibration")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model_path: str
    calibration: _common_pb2.CalibrationSpec
    def __init__(self, job_id: _Optional[str] = ..., model_path: _Optional[str] = ..., calibration: _Optional[_Union[_common_pb2.CalibrationSpec, _Mapping]] = ...) -> None: ...

class StartResponse(_message.Message):
    __slots__ = ("inputs", "holdout", "usage")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    inputs: _common_pb2.TensorRef
    holdout: int
    usage: _common_pb2.ResourceUsage
    def __init__(self, inputs: _Optional[_Union[_common_pb2.TensorRef, _Mapping]] = ..., holdout: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.ResourceUsage, _Mapping]] = ...) -> None: ...

class CollectRequest(_message.Message):
    __slots__ = ("job_id", "model_path", "block", "names", "inputs", "applied", "scaled", "holdout", "reference")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    SCALED_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model_path: str
    block: int
    names: _containers.RepeatedScalarFieldContainer[str]
    inputs: _common_pb2.TensorRef
    applied: _containers.RepeatedCompositeFieldContainer[_common_pb2.QuantizedRef]
    scaled: _containers.RepeatedCompositeFieldContainer[_common_pb2.NamedTensor]
    holdout: int
    reference: _common_pb2.TensorRef
    def __init__(self, job_id: _Optional[str] = ..., model_path: _Optional[str] = ..., block: _Optional[int] = ..., names: _Optional[_Iterable[str]] = ..., inputs: _Optional[_Union[_common_pb2.TensorRef, _Mapping]] = ..., applied: _Optional[_Iterable[_Union[_common_pb2.QuantizedRef, _Mapping]]] = ..., scaled: _Optional[_Iterable[_Union[_common_pb2.NamedTensor, _Mapping]]] = ..., holdout: _Optional[int] = ..., reference: _Optional[_Union[_common_pb2.TensorRef, _Mapping]] = ...) -> None: ...

class CollectResponse(_message.Message):
    __slots__ = ("stats", "usage")
    STATS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    stats: _containers.RepeatedCompositeFieldContainer[_common_pb2.LinearStats]
    usage: _common_pb2.ResourceUsage
    def __init__(self, stats: _Optional[_Iterable[_Union[_common_pb2.LinearStats, _Mapping]]] = ..., usage: _Optional[_Union[_common_pb2.ResourceUsage, _Mapping]] = ...) -> None: ...

class AdvanceRequest(_message.Message):
    __slots__ = ("job_id", "model_path", "block", "inputs", "applied", "scaled", "holdout", "float_outputs", "reference")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    SCALED_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FIELD_NUMBER: _ClassVar[int]
    FLOAT_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model_path: str
    block: int
    inputs: _common_pb2.TensorRef
    applied: _containers.RepeatedCompositeFieldContainer[_common_pb2.QuantizedRef]
    scaled: _containers.RepeatedCompositeFieldContainer[_common_pb2.NamedTensor]
    holdout: int
    float_outputs: bool
    reference: _common_pb2.TensorRef
    def __init__(self, job_id: _Optional[str] = ..., model_path: _Optional[str] = ..., block: _Optional[int] = ..., inputs: _Optional[_Union[_common_pb2.TensorRef, _Mapping]] = ..., applied: _Optional[_Iterable[_Union[_common_pb2.QuantizedRef, _Mapping]]] = ..., scaled: _Optional[_Iterable[_Union[_common_pb2.NamedTensor, _Mapping]]] = ..., holdout: _Optional[int] = ..., float_outputs: _Optional[bool] = ..., reference: _Optional[_Union[_common_pb2.TensorRef, _Mapping]] = ...) -> None: ...

class AdvanceResponse(_message.Message):
    __slots__ = ("outputs", "output_error", "usage", "reference_outputs")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ERROR_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _common_pb2.TensorRef
    output_error: float
    usage: _common_pb2.ResourceUsage
    reference_outputs: _common_pb2.TensorRef
    def __init__(self, outputs: _Optional[_Union[_common_pb2.TensorRef, _Mapping]] = ..., output_error: _Optional[float] = ..., usage: _Optional[_Union[_common_pb2.ResourceUsage, _Mapping]] = ..., reference_outputs: _Optional[_Union[_common_pb2.TensorRef, _Mapping]] = ...) -> None: ...

class FinishRequest(_message.Message):
    __slots__ = ("job_id", "model_path", "block", "applied", "scaled", "holdout", "measure")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    SCALED_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FIELD_NUMBER: _ClassVar[int]
    MEASURE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model_path: str
    block: int
    applied: _containers.RepeatedCompositeFieldContainer[_common_pb2.QuantizedRef]
    scaled: _containers.RepeatedCompositeFieldContainer[_common_pb2.NamedTensor]
    holdout: int
    measure: bool
    def __init__(self, job_id: _Optional[str] = ..., model_path: _Optional[str] = ..., block: _Optional[int] = ..., applied: _Optional[_Iterable[_Union[_common_pb2.QuantizedRef, _Mapping]]] = ..., scaled: _Optional[_Iterable[_Union[_common_pb2.NamedTensor, _Mapping]]] = ..., holdout: _Optional[int] = ..., measure: _Optional[bool] = ...) -> None: ...

class FinishResponse(_message.Message):
    __slots__ = ("output_error", "usage")
    OUTPUT_ERROR_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    output_error: float
    usage: _common_pb2.ResourceUsage
    def __init__(self, output_error: _Optional[float] = ..., usage: _Optional[_Union[_common_pb2.ResourceUsage, _Mapping]] = ...) -> None: ...

class ScaleTarget(_message.Message):
    __slots__ = ("name", "scheme", "clip")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    name: str
    scheme: _common_pb2.QuantScheme
    clip: bool
    def __init__(self, name: _Optional[str] = ..., scheme: _Optional[_Union[_common_pb2.QuantScheme, _Mapping]] = ..., clip: _Optional[bool] = ...) -> None: ...

class ScaleRequest(_message.Message):
    __slots__ = ("job_id", "model_path", "block", "inputs", "targets", "awq", "grid_search", "holdout")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    AWQ_FIELD_NUMBER: _ClassVar[int]
    GRID_SEARCH_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model_path: str
    block: int
    inputs: _common_pb2.TensorRef
    targets: _containers.RepeatedCompositeFieldContainer[ScaleTarget]
    awq: _common_pb2.AWQOptions
    grid_search: _common_pb2.GridSearch
    holdout: int
    def __init__(self, job_id: _Optional[str] = ..., model_path: _Optional[str] = ..., block: _Optional[int] = ..., inputs: _Optional[_Union[_common_pb2.TensorRef, _Mapping]] = ..., targets: _Optional[_Iterable[_Union[ScaleTarget, _Mapping]]] = ..., awq: _Optional[_Union[_common_pb2.AWQOptions, _Mapping]] = ..., grid_search: _Optional[_Union[_common_pb2.GridSearch, _Mapping]] = ..., holdout: _Optional[int] = ...) -> None: ...

class ScaleResponse(_message.Message):
    __slots__ = ("scaled", "report_json", "usage", "references")
    SCALED_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    scaled: _containers.RepeatedCompositeFieldContainer[_common_pb2.NamedTensor]
    report_json: str
    usage: _common_pb2.ResourceUsage
    references: _containers.RepeatedCompositeFieldContainer[_common_pb2.NamedTensor]
    def __init__(self, scaled: _Optional[_Iterable[_Union[_common_pb2.NamedTensor, _Mapping]]] = ..., report_json: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.ResourceUsage, _Mapping]] = ..., references: _Optional[_Iterable[_Union[_common_pb2.NamedTensor, _Mapping]]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
