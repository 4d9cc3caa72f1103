import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    METHOD_RTN: _ClassVar[Method]
    METHOD_GPTQ: _ClassVar[Method]
    METHOD_AWQ: _ClassVar[Method]
    METHOD_AWQ_GPTQ: _ClassVar[Method]
    METHOD_FP8: _ClassVar[Method]

class Format(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FORMAT_UNSPECIFIED: _ClassVar[Format]
    FORMAT_GPTQ: _ClassVar[Format]
    FORMAT_ONNX: _ClassVar[Format]
    FORMAT_MLX: _ClassVar[Format]
    FORMAT_AWQ: _ClassVar[Format]
    FORMAT_COMPRESSED_TENSORS: _ClassVar[Format]
    FORMAT_GGUF: _ClassVar[Format]
    FORMAT_MODELOPT: _ClassVar[Format]
    FORMAT_TRTLLM: _ClassVar[Format]

class CalibrationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CALIBRATION_MODE_UNSPECIFIED: _ClassVar[CalibrationMode]
    CALIBRATION_MODE_SEQUENTIAL: _ClassVar[CalibrationMode]
    CALIBRATION_MODE_PARALLEL: _ClassVar[CalibrationMode]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
METHOD_UNSPECIFIED: Method
METHOD_RTN: Method
METHOD_GPTQ: Method
METHOD_AWQ: Method
METHOD_AWQ_GPTQ: Method
METHOD_FP8: Method
FORMAT_UNSPECIFIED: Format
FORMAT_GPTQ: Format
FORMAT_ONNX: Format
FORMAT_MLX: Format
FORMAT_AWQ: Format
FORMAT_COMPRESSED_TENSORS: Format
FORMAT_GGUF: Format
FORMAT_MODELOPT: Format
FORMAT_TRTLLM: Format
CALIBRATION_MODE_UNSPECIFIED: CalibrationMode
CALIBRATION_MODE_SEQUENTIAL: CalibrationMode
CALIBRATION_MODE_PARALLEL: CalibrationMode
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class TensorRef(_message.Message):
    __slots__ = ("key", "name", "dtype", "shape", "sha256")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    key: str
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    sha256: str
    def __init__(self, key: _Optional[str] = ..., name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., sha256: _Optional[str] = ...) -> None: ...

class QuantScheme(_message.Message):
    __slots__ = ("bits", "group_size", "sym", "min_zero")
    BITS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    SYM_FIELD_NUMBER: _ClassVar[int]
    MIN_ZERO_FIELD_NUMBER: _ClassVar[int]
    bits: int
    group_size: int
    sym: bool
    min_zero: int
    def __init__(self, bits: _Optional[int] = ..., group_size: _Optional[int] = ..., sym: _Optional[bool] = ..., min_zero: _Optional[int] = ...) -> None: ...

class GGMLScheme(_message.Message):
    __slots__ = ("type", "importance")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    type: str
    importance: bool
    def __init__(self, type: _Optional[str] = ..., importance: _Optional[bool] = ...) -> None: ...

class GridSearch(_message.Message):
    __slots__ = ("steps", "max_shrink", "norm")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_SHRINK_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    steps: int
    max_shrink: float
    norm: float
    def __init__(self, steps: _Optional[int] = ..., max_shrink: _Optional[float] = ..., norm: _Optional[float] = ...) -> None: ...

class GPTQOptions(_message.Message):
    __slots__ = ("damp_percent", "act_order", "static_groups", "true_sequential", "block_size", "grid_search", "asymmetric_calibration")
    DAMP_PERCENT_FIELD_NUMBER: _ClassVar[int]
    ACT_ORDER_FIELD_NUMBER: _ClassVar[int]
    STATIC_GROUPS_FIELD_NUMBER: _ClassVar[int]
    TRUE_SEQUENTIAL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRID_SEARCH_FIELD_NUMBER: _ClassVar[int]
    ASYMMETRIC_CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    damp_percent: float
    act_order: bool
    static_groups: bool
    true_sequential: bool
    block_size: int
    grid_search: GridSearch
    asymmetric_calibration: bool
    def __init__(self, damp_percent: _Optional[float] = ..., act_order: _Optional[bool] = ..., static_groups: _Optional[bool] = ..., true_sequential: _Optional[bool] = ..., block_size: _Optional[int] = ..., grid_search: _Optional[_Union[GridSearch, _Mapping]] = ..., asymmetric_calibration: _Optional[bool] = ...) -> None: ...

class AWQOptions(_message.Message):
    __slots__ = ("grid", "duo_scaling", "clip", "clip_grid", "max_shrink", "clip_tokens")
    GRID_FIELD_NUMBER: _ClassVar[int]
    DUO_SCALING_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    CLIP_GRID_FIELD_NUMBER: _ClassVar[int]
    MAX_SHRINK_FIELD_NUMBER: _ClassVar[int]
    CLIP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    grid: int
    duo_scaling: bool
    clip: bool
    clip_grid: int
    max_shrink: float
    clip_tokens: int
    def __init__(self, grid: _Optional[int] = ..., duo_scaling: _Optional[bool] = ..., clip: _Optional[bool] = ..., clip_grid: _Optional[int] = ..., max_shrink: _Optional[float] = ..., clip_tokens: _Optional[int] = ...) -> None: ...

class FP8Scheme(_message.Message):
    __slots__ = ("per_channel", "static_activations")
    PER_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    STATIC_ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    per_channel: bool
    static_activations: bool
    def __init__(self, per_channel: _Optional[bool] = ..., static_activations: _Optional[bool] = ...) -> None: ...

class ModuleOverride(_message.Message):
    __slots__ = ("pattern", "scheme", "method", "skip", "ggml")
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    GGML_FIELD_NUMBER: _ClassVar[int]
    pattern: str
    scheme: QuantScheme
    method: Method
    skip: bool
    ggml: GGMLScheme
    def __init__(self, pattern: _Optional[str] = ..., scheme: _Optional[_Union[QuantScheme, _Mapping]] = ..., method: _Optional[_Union[Method, str]] = ..., skip: _Optional[bool] = ..., ggml: _Optional[_Union[GGMLScheme, _Mapping]] = ...) -> None: ...

class Recipe(_message.Message):
    __slots__ = ("method", "scheme", "gptq", "overrides", "awq", "fp8")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    GPTQ_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    AWQ_FIELD_NUMBER: _ClassVar[int]
    FP8_FIELD_NUMBER: _ClassVar[int]
    method: Method
    scheme: QuantScheme
    gptq: GPTQOptions
    overrides: _containers.RepeatedCompositeFieldContainer[ModuleOverride]
    awq: AWQOptions
    fp8: FP8Scheme
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., scheme: _Optional[_Union[QuantScheme, _Mapping]] = ..., gptq: _Optional[_Union[GPTQOptions, _Mapping]] = ..., overrides: _Optional[_Iterable[_Union[ModuleOverride, _Mapping]]] = ..., awq: _Optional[_Union[AWQOptions, _Mapping]] = ..., fp8: _Optional[_Union[FP8Scheme, _Mapping]] = ...) -> None: ...

class CalibrationSpec(_message.Message):
    __slots__ = ("files", "samples", "seq_len", "seed", "mode", "holdout_samples")
    FILES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedScalarFieldContainer[str]
    samples: int
    seq_len: int
    seed: int
    mode: CalibrationMode
    holdout_samples: int
    def __init__(self, files: _Optional[_Iterable[str]] = ..., samples: _Optional[int] = ..., seq_len: _Optional[int] = ..., seed: _Optional[int] = ..., mode: _Optional[_Union[CalibrationMode, str]] = ..., holdout_samples: _Optional[int] = ...) -> None: ...

class OutputFormat(_message.Message):
    __slots__ = ("format", "variant")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    format: Format
    variant: str
    def __init__(self, format: _Optional[_Union[Format, str]] = ..., variant: _Optional[str] = ...) -> None: ...

class OutputSpec(_message.Message):
    __slots__ = ("path", "formats")
    PATH_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    path: str
    formats: _containers.RepeatedCompositeFieldContainer[OutputFormat]
    def __init__(self, path: _Optional[str] = ..., formats: _Optional[_Iterable[_Union[OutputFormat, _Mapping]]] = ...) -> None: ...

class QualityGate(_message.Message):
    __slots__ = ("max_ppl_increase_pct", "max_kl", "min_top1")
    MAX_PPL_INCREASE_PCT_FIELD_NUMBER: _ClassVar[int]
    MAX_KL_FIELD_NUMBER: _ClassVar[int]
    MIN_TOP1_FIELD_NUMBER: _ClassVar[int]
    max_ppl_increase_pct: float
    max_kl: float
    min_top1: float
    def __init__(self, max_ppl_increase_pct: _Optional[float] = ..., max_kl: _Optional[float] = ..., min_top1: _Optional[float] = ...) -> None: ...

class EvalSpec(_message.Message):
    __slots__ = ("files", "seq_len", "gate")
    FILES_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedScalarFieldContainer[str]
    seq_len: int
    gate: QualityGate
    def __init__(self, files: _Optional[_Iterable[str]] = ..., seq_len: _Optional[int] = ..., gate: _Optional[_Union[QualityGate, _Mapping]] = ...) -> None: ...

class ProgressEvent(_message.Message):
    __slots__ = ("job_id", "state", "phase", "block", "num_blocks", "step", "total_steps", "message", "time", "sequence")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    phase: str
    block: int
    num_blocks: int
    step: int
    total_steps: int
    message: str
    time: _timestamp_pb2.Timestamp
    sequence: int
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., phase: _Optional[str] = ..., block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., message: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sequence: _Optional[int] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("format", "variant", "path", "bytes", "sha256", "metrics", "bits_per_weight")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    format: Format
    variant: str
    path: str
    bytes: int
    sha256: str
    metrics: _containers.RepeatedCompositeFieldContainer[EvalResult]
    bits_per_weight: float
    def __init__(self, format: _Optional[_Union[Format, str]] = ..., variant: _Optional[str] = ..., path: _Optional[str] = ..., bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., metrics: _Optional[_Iterable[_Union[EvalResult, _Mapping]]] = ..., bits_per_weight: _Optional[float] = ...) -> None: ...

class EvalResult(_message.Message):
    __slots__ = ("dataset", "ppl", "tokens", "kl", "top1", "reference_ppl", "tokens_per_s")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    PPL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    TOP1_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_PPL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    ppl: float
    tokens: int
    kl: float
    top1: float
    reference_ppl: float
    tokens_per_s: float
    def __init__(self, dataset: _Optional[str] = ..., ppl: _Optional[float] = ..., tokens: _Optional[int] = ..., kl: _Optional[float] = ..., top1: _Optional[float] = ..., reference_ppl: _Optional[float] = ..., tokens_per_s: _Optional[float] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: TensorRef
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[TensorRef, _Mapping]] = ...) -> None: ...

class LinearStats(_message.Message):
    __slots__ = ("name", "weight", "hessian", "tokens", "reference", "input_absmax", "cross")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    HESSIAN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    INPUT_ABSMAX_FIELD_NUMBER: _ClassVar[int]
    CROSS_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: TensorRef
    hessian: TensorRef
    tokens: int
    reference: TensorRef
    input_absmax: float
    cross: TensorRef
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[_Union[TensorRef, _Mapping]] = ..., hessian: _Optional[_Union[TensorRef, _Mapping]] = ..., tokens: _Optional[int] = ..., reference: _Optional[_Union[TensorRef, _Mapping]] = ..., input_absmax: _Optional[float] = ..., cross: _Optional[_Union[TensorRef, _Mapping]] = ...) -> None: ...

class QuantizedRef(_message.Message):
    __slots__ = ("name", "codes", "scales", "zeros", "g_idx", "scheme", "blocks", "ggml", "in_features", "fp8_data", "fp8_scale", "fp8_input_scale", "fp8")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    ZEROS_FIELD_NUMBER: _ClassVar[int]
    G_IDX_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    GGML_FIELD_NUMBER: _ClassVar[int]
    IN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    FP8_DATA_FIELD_NUMBER: _ClassVar[int]
    FP8_SCALE_FIELD_NUMBER: _ClassVar[int]
    FP8_INPUT_SCALE_FIELD_NUMBER: _ClassVar[int]
    FP8_FIELD_NUMBER: _ClassVar[int]
    name: str
    codes: TensorRef
    scales: TensorRef
    zeros: TensorRef
    g_idx: TensorRef
    scheme: QuantScheme
    blocks: TensorRef
    ggml: GGMLScheme
    in_features: int
    fp8_data: TensorRef
    fp8_scale: TensorRef
    fp8_input_scale: TensorRef
    fp8: FP8Scheme
    def __init__(self, name: _Optional[str] = ..., codes: _Optional[_Union[TensorRef, _Mapping]] = ..., scales: _Optional[_Union[TensorRef, _Mapping]] = ..., zeros: _Optional[_Union[TensorRef, _Mapping]] = ..., g_idx: _Optional[_Union[TensorRef, _Mapping]] = ..., scheme: _Optional[_Union[QuantScheme, _Mapping]] = ..., blocks: _Optional[_Union[TensorRef, _Mapping]] = ..., ggml: _Optional[_Union[GGMLScheme, _Mapping]] = ..., in_features: _Optional[int] = ..., fp8_data: _Optional[_Union[TensorRef, _Mapping]] = ..., fp8_scale: _Optional[_Union[TensorRef, _Mapping]] = ..., fp8_input_scale: _Optional[_Union[TensorRef, _Mapping]] = ..., fp8: _Optional[_Union[FP8Scheme, _Mapping]] = ...) -> None: ...

class ResourceUsage(_message.Message):
    __slots__ = ("device", "peak_host_bytes", "peak_device_bytes")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PEAK_HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    device: str
    peak_host_bytes: int
    peak_device_bytes: int
    def __init__(self, device: _Optional[str] = ..., peak_host_bytes: _Optional[int] = ..., peak_device_bytes: _Optional[int] = ...) -> None: ...

class LayerDiagnostics(_message.Message):
    __slots__ = ("name", "block", "target", "method", "grid", "bits_per_weight", "parameters", "error", "rtn_error", "weight_energy", "damp_percent")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RTN_ERROR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_ENERGY_FIELD_NUMBER: _ClassVar[int]
    DAMP_PERCENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    block: int
    target: str
    method: Method
    grid: str
    bits_per_weight: float
    parameters: int
    error: float
    rtn_error: float
    weight_energy: float
    damp_percent: float
    def __init__(self, name: _Optional[str] = ..., block: _Optional[int] = ..., target: _Optional[str] = ..., method: _Optional[_Union[Method, str]] = ..., grid: _Optional[str] = ..., bits_per_weight: _Optional[float] = ..., parameters: _Optional[int] = ..., error: _Optional[float] = ..., rtn_error: _Optional[float] = ..., weight_energy: _Optional[float] = ..., damp_percent: _Optional[float] = ...) -> None: ...

class BlockDiagnostics(_message.Message):
    __slots__ = ("block", "output_error", "samples")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ERROR_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    block: int
    output_error: float
    samples: int
    def __init__(self, block: _Optional[int] = ..., output_error: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class PhaseTime(_message.Message):
    __slots__ = ("phase", "seconds", "calls")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    phase: str
    seconds: float
    calls: int
    def __init__(self, phase: _Optional[str] = ..., seconds: _Optional[float] = ..., calls: _Optional[int] = ...) -> None: ...

class TimelineSpan(_message.Message):
    __slots__ = ("name", "service", "phase", "block", "start_s", "duration_s", "span_id", "parent_id", "worker")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    START_S_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    name: str
    service: str
    phase: str
    block: int
    start_s: float
    duration_s: float
    span_id: str
    parent_id: str
    worker: str
    def __init__(self, name: _Optional[str] = ..., service: _Optional[str] = ..., phase: _Optional[str] = ..., block: _Optional[int] = ..., start_s: _Optional[float] = ..., duration_s: _Optional[float] = ..., span_id: _Optional[str] = ..., parent_id: _Optional[str] = ..., worker: _Optional[str] = ...) -> None: ...

class ServiceUsage(_message.Message):
    __slots__ = ("service", "usage", "busy_s")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    BUSY_S_FIELD_NUMBER: _ClassVar[int]
    service: str
    usage: ResourceUsage
    busy_s: float
    def __init__(self, service: _Optional[str] = ..., usage: _Optional[_Union[ResourceUsage, _Mapping]] = ..., busy_s: _Optional[float] = ...) -> None: ...

class JobDiagnostics(_message.Message):
    __slots__ = ("layers", "blocks", "phases", "timeline", "services", "wall_s", "trace_id")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    WALL_S_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerDiagnostics]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockDiagnostics]
    phases: _containers.RepeatedCompositeFieldContainer[PhaseTime]
    timeline: _containers.RepeatedCompositeFieldContainer[TimelineSpan]
    services: _containers.RepeatedCompositeFieldContainer[ServiceUsage]
    wall_s: float
    trace_id: str
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerDiagnostics, _Mapping]]] = ..., blocks: _Optional[_Iterable[_Union[BlockDiagnostics, _Mapping]]] = ..., phases: _Optional[_Iterable[_Union[PhaseTime, _Mapping]]] = ..., timeline: _Optional[_Iterable[_Union[TimelineSpan, _Mapping]]] = ..., services: _Optional[_Iterable[_Union[ServiceUsage, _Mapping]]] = ..., wall_s: _Optional[float] = ..., trace_id: _Optional[str] = ...) -> None: ...
