"""What a quantized tensor is: the grid (bits, group size, symmetry) and the method that fills it.

These dataclasses are the one home of quantization configuration: the CLI builds them, the protobuf
converter (`bitsmith.rpc.convert`) maps them to and from the wire, and algorithms and formats take
them. They validate on construction so a bad scheme fails at the edge, never deep inside a solve.

>>> QuantScheme(bits=4, group_size=128, sym=False).maxq
15
>>> QuantScheme(bits=5)
Traceback (most recent call last):
...
bitsmith.errors.ConfigError: bits must be one of (2, 3, 4, 8), got 5
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from bitsmith.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
PER_CHANNEL = -1


class Method(StrEnum):
    """How a linear's quantized values are chosen."""

    RTN = "rtn"
    """Round to nearest on the grid: no calibration data needed."""
    GPTQ = "gptq"
    """Hessian-aware error compensation (Frantar et al.), column block by column block."""
    AWQ = "awq"
    """Activation-aware scaling folded into the preceding op and a clipping search (Lin et al.),
    then round to nearest on the scaled weights."""
    AWQ_GPTQ = "awq+gptq"
    """AWQ's scaling, then GPTQ on the scaled weights (no clipping search: GPTQ's error feedback moves the
    weights a clip would be chosen for, and its grid fits each group's range itself)."""
    FP8 = "fp8"
    """Weights rounded to nearest on the float8 e4m3 grid (`FP8Scheme`), activations cast to FP8 at run
    time: Hopper's FP8 tensor cores, near-lossless without a solve."""

    @property
    def needs_calibration(self) -> bool:
        """Whether the method needs activations from calibration data (RTN and FP8 do not; FP8's
        static activation scales come from calibration too: see `FP8Scheme.static_activations`)."""
        return self not in (Method.RTN, Method.FP8)

    @property
    def scales_activations(self) -> bool:
        """Whether the method rescales a block (AWQ) before its linears are solved."""
        return self in (Method.AWQ, Method.AWQ_GPTQ)


class Format(StrEnum):
    """Artifact layouts the packer writes."""

    GPTQ = "gptq"
    """GPTQ safetensors (qweight/qzeros/scales/g_idx) as GPTQModel, transformers and vLLM load it."""
    ONNX = "onnx"
    """An ONNX graph whose linears are `com.microsoft::MatMulNBits`, for ONNX Runtime on any CPU."""
    MLX = "mlx"
    """mlx-lm's quantized safetensors (uint32-packed codes, scales and biases per group)."""
    AWQ = "awq"
    """AutoAWQ's "GEMM" safetensors (4-bit, packed along the output dim) as vLLM and transformers load it."""
    COMPRESSED_TENSORS = "compressed-tensors"
    """compressed-tensors "pack-quantized" safetensors, as llm-compressor writes and vLLM loads them."""
    GGUF = "gguf"
    """One GGUF file as llama.cpp loads it; the variant names the tensor types (``gguf:Q4_K_M``)."""
    MODELOPT = "modelopt"
    """NVIDIA ModelOpt's unified HF checkpoint (hf_quant_config.json): FP8 or W4A16 AWQ, as TensorRT-LLM's
    PyTorch flow and vLLM's modelopt method load it."""
    TRTLLM = "trtllm"
    """TensorRT-LLM's checkpoint (config.json + rank0.safetensors, TensorRT-LLM tensor names), the input of
    trtllm-build: FP8 or W4A16 GPTQ/AWQ."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantScheme:
    """An integer grid: `bits` per weight, one (scale, zero) per `group_size` input columns of a row.

    `group_size=-1` means one group per output row (per-channel). `sym` puts the zero in the middle of
    the grid (2^(bits-1)), which is what Marlin-style kernels want; asymmetric grids fit min..max.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    min_zero: int = 0
    """Lowest zero point an asymmetric grid may use. GPTQ "v1" checkpoints store zero - 1 and so
    cannot hold a zero of 0; jobs that write them quantize with ``min_zero=1`` so the solver, not
    the packer, pays for the constraint (the packer refuses codes that break it)."""

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if not 0 <= self.min_zero < self.maxq:
            raise ConfigError(f"min_zero must be in [0, {self.maxq}), got {self.min_zero}")
        if self.group_size != PER_CHANNEL and self.group_size <= 0:
            raise ConfigError(f"group_size must be positive or -1 (per channel), got {self.group_size}")

    @property
    def maxq(self) -> int:
        """The largest integer code."""
        return (1 << self.bits) - 1

    def groups(self, in_features: int) -> int:
        """Number of groups along the input dimension; raises if the group size does not divide it."""
        if self.group_size == PER_CHANNEL:
            return 1
        if in_features % self.group_size:
            raise ConfigError(
                f"group_size {self.group_size} does not divide in_features {in_features}"
            )
        return in_features // self.group_size

    def effective_group_size(self, in_features: int) -> int:
        """Columns per group for a layer with `in_features` inputs."""
        return in_features if self.group_size == PER_CHANNEL else self.group_size

    def bits_per_weight(self, in_features: int) -> float:
        """Stored bits per weight with the group's 16-bit scale and, asymmetric, its `bits`-wide zero
        (how GPTQ, AWQ and compressed-tensors files store them), so grids compare by what they cost."""
        overhead = 16 + (0 if self.sym else self.bits)
        return self.bits + overhead / self.effective_group_size(in_features)

    @property
    def label(self) -> str:
        """``w4 g128 asym`` (``w8 channel sym`` per channel): how reports name the grid."""
        group = "channel" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
        return f"w{self.bits} {group} {'sym' if self.sym else 'asym'}"


class GGMLType(StrEnum):
    """The ggml tensor types bitsmith writes into GGUF files (names and ids as in ggml.h).

    Float types hold the weight as is; the others are blocks of `block_size` weights along a row,
    `type_size` bytes each (FORMATS.md §5.7): the legacy types one scale (and min) per 32 weights,
    the K-quants a 256-weight super-block of 16 or 32-weight sub-blocks with quantized scales.
    """

    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    Q8_0 = "Q8_0"
    Q4_0 = "Q4_0"
    Q4_1 = "Q4_1"
    Q5_0 = "Q5_0"
    Q5_1 = "Q5_1"
    Q2_K = "Q2_K"
    Q3_K = "Q3_K"
    Q4_K = "Q4_K"
    Q5_K = "Q5_K"
    Q6_K = "Q6_K"

    @property
    def ggml_id(self) -> int:
        """The type's id in ggml's `enum ggml_type` (what a GGUF tensor record stores)."""
        return _GGML_LAYOUT[self][0]

    @property
    def block_size(self) -> int:
        """Weights per block (1 for float types)."""
        return _GGML_LAYOUT[self][1]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return _GGML_LAYOUT[self][2]

    @property
    def is_quantized(self) -> bool:
        return self.block_size > 1

    def row_bytes(self, in_features: int) -> int:
        """Bytes of one row of `in_features` weights; `ConfigError` unless blocks tile the row."""
        if in_features % self.block_size:
            raise ConfigError(f"{self.value} needs rows of a multiple of {self.block_size} weights, got {in_features}")
        return in_features // self.block_size * self.type_size


_GGML_LAYOUT: dict[GGMLType, tuple[int, int, int]] = {
    GGMLType.F32: (0, 1, 4),
    GGMLType.F16: (1, 1, 2),
    GGMLType.BF16: (30, 1, 2),
    GGMLType.Q8_0: (8, 32, 34),
    GGMLType.Q4_0: (2, 32, 18),
    GGMLType.Q4_1: (3, 32, 20),
    GGMLType.Q5_0: (6, 32, 22),
    GGMLType.Q5_1: (7, 32, 24),
    GGMLType.Q2_K: (10, 256, 84),
    GGMLType.Q3_K: (11, 256, 110),
    GGMLType.Q4_K: (12, 256, 144),
    GGMLType.Q5_K: (13, 256, 176),
    GGMLType.Q6_K: (14, 256, 210),
}
"""(ggml id, block size, bytes per block) of each type (ggml.h / ggml-common.h, FORMATS.md §5.7)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GGMLScheme:
    """A ggml block grid as a solve target: the linear is quantized straight onto `type`'s blocks.

    `importance` weights the block search by the Hessian diagonal (llama.cpp's importance matrix)
    when calibration statistics exist; RTN without calibration searches unweighted, as
    llama-quantize does without an imatrix.
    """

    type: GGMLType
    importance: bool = True

    def __post_init__(self) -> None:
        if not GGMLType(self.type).is_quantized:
            raise ConfigError(f"{self.type} is a float type, not a quantization grid")

    def groups(self, in_features: int) -> int:
        """Blocks per row; raises if the block size does not divide `in_features`."""
        self.type.row_bytes(in_features)
        return in_features // self.type.block_size

    def bits_per_weight(self, in_features: int) -> float:
        """Stored bits per weight: a block's bytes over its weights (4.5 for Q4_K), whatever the row."""
        return 8 * self.type.type_size / self.type.block_size

    @property
    def label(self) -> str:
        return self.type.value


FP8_E4M3_MAX = 448.0
"""The largest float8 e4m3 value (`torch.finfo(torch.float8_e4m3fn).max`): scales map absmax onto it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FP8Scheme:
    """The float8 e4m3 grid: one float32 scale per output row (`per_channel`) or per tensor.

    Activations are cast to FP8 too when the model runs: with a scale per token computed on the fly
    (dynamic, the default: nothing to calibrate, robust to outlier tokens), or with one calibrated
    scale per tensor (`static_activations`: the input's absmax over the calibration set / 448), which
    saves the per-token reduction and is what TensorRT-LLM's FP8 path and the "FP8" preset want.
    """

    per_channel: bool = True
    static_activations: bool = False

    def groups(self, in_features: int) -> int:
        """One scale per row (or tensor), whatever the row length."""
        return 1

    def bits_per_weight(self, in_features: int) -> float:
        """8 bits per weight plus the row's (or the tensor's, counted as nothing) float32 scale."""
        return 8 + (32 / in_features if self.per_channel else 0.0)

    @property
    def label(self) -> str:
        """``fp8 channel dynamic`` / ``fp8 tensor static``: how reports name the grid."""
        return f"fp8 {'channel' if self.per_channel else 'tensor'} {'static' if self.static_activations else 'dynamic'}"


Scheme = QuantScheme | GGMLScheme | FP8Scheme
"""Any solve target: an integer grid (GPTQ, AWQ, compressed-tensors, ONNX, MLX), a ggml block grid, or
the float8 grid."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GridSearch:
    """Search shrunk ranges for the grid with the least rounding error (see the module docstring).

    `steps` sets the shrink step (1/steps), `max_shrink` how far the search goes (0.8: down to 20%
    of the range) and `norm` the exponent of the error (2.4 as in GPTQ's reference code).
    """

    steps: int = 100
    max_shrink: float = 0.8
    norm: float = 2.4

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"GridSearch.steps must be positive, got {self.steps}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ConfigError(f"GridSearch.max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.norm <= 0:
            raise ConfigError(f"GridSearch.norm must be positive, got {self.norm}")

    @property
    def factors(self) -> list[float]:
        """Range multipliers tried, largest first (1.0 is always among them)."""
        return [1 - i / self.steps for i in range(max(1, int(self.max_shrink * self.steps)))]


@dataclass(frozen=True, slots=True, kw_only=True)
class GPTQOptions:
    """Knobs of the GPTQ solve (ignored by RTN).

    `damp_percent` is the ridge added to the Hessian diagonal as a fraction of its mean; it escalates
    (x10 up to `max_damp_percent`) when the Cholesky factorization fails, and the damping actually
    used is reported per layer. `act_order` processes columns by descending Hessian diagonal;
    `static_groups` fixes every group's scale/zero from the unquantized weights up front so groups
    stay contiguous in the original order even with act-order. `block_size` is the width of the
    column blocks whose trailing update is done lazily as one matrix product.

    Both are on by default ("static" activation ordering, llm-compressor's default too): solving the
    columns that matter most first, while their errors can still be compensated, is the largest
    quality gain GPTQ has to offer, and with static groups the artifact keeps contiguous groups, so
    every runtime kernel serves it at no cost. On the demo model it takes w4 g128 GPTQ from 0.56 /
    0.81 of round-to-nearest's perplexity increase (prose / code) to 0.51 / 0.53; without it the code
    figure moved by ±0.03 with the CPU's float32 rounding. ggml grids are solved in column order
    whatever these say: a ggml row records no column order.
    """

    damp_percent: float = 0.01
    max_damp_percent: float = 1.0
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True
    block_size: int = 128
    grid_search: GridSearch | None = None
    """Fit every group's grid to the shrunk range with the least rounding error instead of min..max
    (GPTQ's "mse" option; RTN honours it too). Off by default: the textbook grid."""
    asymmetric_calibration: bool = False
    """Solve each linear for the float model's outputs rather than its own float outputs on the quantized
    stream's inputs: min ‖W·X - Ŵ·X̃‖² with X the float model's inputs and X̃ those the earlier quantized
    linears produce (`bitsmith.algos.gptq.asymmetric_target`), so each solve also cancels the error that
    reaches it; GPTQ (also after AWQ) solves for that target, AWQ rounds it (`MethodSpec.fits_outputs`).
    The float model's activations run beside the quantized stream (one more forward of each
    block, and its activations held twice). Sequential mode only: parallel mode calibrates on the float
    model, where X̃ = X and the option changes nothing."""

    def __post_init__(self) -> None:
        if not 0.0 < self.damp_percent <= self.max_damp_percent:
            raise ConfigError(
                f"damp_percent must be in (0, max_damp_percent={self.max_damp_percent}], "
                f"got {self.damp_percent}"
            )
        if self.block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")


@dataclass(frozen=True, slots=True, kw_only=True)
class AWQOptions:
    """Knobs of AWQ's searches (ignored by other methods).

    Per scaling group (a norm or linear and the linears reading its output), scales
    ``s = x_mean^r / w_mean^(1-r)`` (``x_mean^r`` without `duo_scaling`) are tried for r = i/`grid`
    and the one with the least block-output error after quantization is folded into the preceding op.
    `clip` then searches each group's clipping range, each end down to (1 - `max_shrink`) of its extreme in
    `clip_grid` steps, on `clip_tokens` evenly sampled tokens, for the linears rounded to nearest
    afterwards (`awq`; `awq+gptq` leaves the range to GPTQ's grid). The search sees the tokens through
    their Hessian, so their number costs no memory: the default takes every token of a 128 x 512
    calibration (AutoAWQ's 512 were a memory limit of keeping the tokens themselves).
    """

    grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 1 << 16

    def __post_init__(self) -> None:
        for name in ("grid", "clip_grid", "clip_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"AWQOptions.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ConfigError(f"AWQOptions.max_shrink must be in [0, 1), got {self.max_shrink}")

