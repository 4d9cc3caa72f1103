"""Wire messages <-> library types: the only place both meet.

Services call these at their edges, so the library never sees protobuf and the wire never sees a
torch tensor or a Python enum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bitsmith.errors import ConfigError
from bitsmith.recipes import ModuleOverride, Recipe
from bitsmith.runtimes import DatasetResult
from bitsmith.schemes import (
    AWQOptions,
    Format,
    FP8Scheme,
    GGMLScheme,
    GGMLType,
    GPTQOptions,
    GridSearch,
    Method,
    QuantScheme,
    Scheme,
)
from bitsmith.store import FP8Ref, GGMLRef, QuantizedRef, StoredWeight, TensorRef
from bitsmith.v1 import common_pb2

if TYPE_CHECKING:
    import torch

    from bitsmith.v1 import solver_pb2

_METHODS = {
    Method.RTN: common_pb2.METHOD_RTN,
    Method.GPTQ: common_pb2.METHOD_GPTQ,
    Method.AWQ: common_pb2.METHOD_AWQ,
    Method.AWQ_GPTQ: common_pb2.METHOD_AWQ_GPTQ,
    Method.FP8: common_pb2.METHOD_FP8,
}


def method_to_proto(method: Method) -> common_pb2.Method:
    return _METHODS[method]


def method_from_proto(value: int) -> Method:
    for method, proto in _METHODS.items():
        if proto == value:
            return method
    raise ConfigError(f"unknown or unspecified method {value}; known: {[m.value for m in Method]}")


def scheme_to_proto(scheme: QuantScheme) -> common_pb2.QuantScheme:
    return common_pb2.QuantScheme(
        bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym, min_zero=scheme.min_zero
    )


def scheme_from_proto(msg: common_pb2.QuantScheme) -> QuantScheme:
    if msg.bits == 0:
        raise ConfigError("the quantization scheme has no bits set")
    return QuantScheme(bits=msg.bits, group_size=msg.group_size, sym=msg.sym, min_zero=msg.min_zero)


def ggml_scheme_to_proto(scheme: GGMLScheme) -> common_pb2.GGMLScheme:
    return common_pb2.GGMLScheme(type=scheme.type.value, importance=scheme.importance)


def ggml_scheme_from_proto(msg: common_pb2.GGMLScheme) -> GGMLScheme:
    try:
        ggml_type = GGMLType(msg.type)
    except ValueError:
        raise ConfigError(f"unknown ggml type {msg.type!r}; known: {[t.value for t in GGMLType]}") from None
    return GGMLScheme(type=ggml_type, importance=msg.importance)


def fp8_scheme_to_proto(scheme: FP8Scheme) -> common_pb2.FP8Scheme:
    return common_pb2.FP8Scheme(per_channel=scheme.per_channel, static_activations=scheme.static_activations)


def fp8_scheme_from_proto(msg: common_pb2.FP8Scheme) -> FP8Scheme:
    return FP8Scheme(per_channel=msg.per_channel, static_activations=msg.static_activations)


def set_solve_grid(request: solver_pb2.SolveRequest, scheme: Scheme) -> None:
    """Put `scheme` into the one field of a solve request that holds its kind of grid."""
    if isinstance(scheme, GGMLScheme):
        request.ggml.CopyFrom(ggml_scheme_to_proto(scheme))
    elif isinstance(scheme, FP8Scheme):
        request.fp8.CopyFrom(fp8_scheme_to_proto(scheme))
    else:
        request.scheme.CopyFrom(scheme_to_proto(scheme))


def solve_grid(request: solver_pb2.SolveRequest) -> Scheme:
    """The grid a solve request asks for (the inverse of `set_solve_grid`)."""
    if request.HasField("ggml"):
        return ggml_scheme_from_proto(request.ggml)
    if request.HasField("fp8"):
        return fp8_scheme_from_proto(request.fp8)
    return scheme_from_proto(request.scheme)


def gptq_to_proto(options: GPTQOptions) -> common_pb2.GPTQOptions:
    msg = common_pb2.GPTQOptions(
        damp_percent=options.damp_percent, act_order=options.act_order,
        static_groups=options.static_groups, true_sequential=options.true_sequential,
        block_size=options.block_size, asymmetric_calibration=options.asymmetric_calibration,
    )
    if options.grid_search is not None:
        msg.grid_search.CopyFrom(grid_search_to_proto(options.grid_search))
    return msg


def grid_search_to_proto(search: GridSearch) -> common_pb2.GridSearch:
    return common_pb2.GridSearch(steps=search.steps, max_shrink=search.max_shrink, norm=search.norm)


def grid_search_from_proto(msg: common_pb2.GridSearch) -> GridSearch:
    return GridSearch(steps=msg.steps, max_shrink=msg.max_shrink, norm=msg.norm)


def gptq_from_proto(msg: common_pb2.GPTQOptions) -> GPTQOptions:
    """Unset fields (zero) take the library defaults, so a minimal request stays valid."""
    defaults = GPTQOptions()
    return GPTQOptions(
        damp_percent=msg.damp_percent or defaults.damp_percent,
        act_order=msg.act_order,
        static_groups=msg.static_groups,
        true_sequential=msg.true_sequential,
        block_size=msg.block_size or defaults.block_size,
        grid_search=grid_search_from_proto(msg.grid_search) if msg.HasField("grid_search") else None,
        asymmetric_calibration=msg.asymmetric_calibration,
    )


def awq_to_proto(options: AWQOptions) -> common_pb2.AWQOptions:
    return common_pb2.AWQOptions(
        grid=options.grid, duo_scaling=options.duo_scaling, clip=options.clip, clip_grid=options.clip_grid,
        max_shrink=options.max_shrink, clip_tokens=options.clip_tokens,
    )


def awq_from_proto(msg: common_pb2.AWQOptions) -> AWQOptions:
    """An unset message takes the library defaults; inside a set one, zero counts take the defaults."""
    defaults = AWQOptions()
    if not msg.ByteSize():
        return defaults
    return AWQOptions(
        grid=msg.grid or defaults.grid, duo_scaling=msg.duo_scaling, clip=msg.clip,
        clip_grid=msg.clip_grid or defaults.clip_grid, max_shrink=msg.max_shrink,
        clip_tokens=msg.clip_tokens or defaults.clip_tokens,
    )


def recipe_to_proto(recipe: Recipe) -> common_pb2.Recipe:
    msg = common_pb2.Recipe(
        method=method_to_proto(recipe.method), scheme=scheme_to_proto(recipe.scheme),
        gptq=gptq_to_proto(recipe.gptq), awq=awq_to_proto(recipe.awq), fp8=fp8_scheme_to_proto(recipe.fp8),
    )
    for override in recipe.overrides:
        item = msg.overrides.add(pattern=override.pattern, skip=override.skip)
        if isinstance(override.scheme, GGMLScheme):
            item.ggml.CopyFrom(ggml_scheme_to_proto(override.scheme))
        elif isinstance(override.scheme, FP8Scheme):
            raise ConfigError(f"override {override.pattern!r}: the float8 grid is the recipe's fp8 section; an "
                              "override selects it with method fp8")
        elif override.scheme is not None:
            item.scheme.CopyFrom(scheme_to_proto(override.scheme))
        if override.method is not None:
            item.method = method_to_proto(override.method)
    return msg


def recipe_from_proto(msg: common_pb2.Recipe) -> Recipe:
    """Validates as it converts: a bad regex, scheme or method is a `ConfigError` naming it. An unset
    fp8 section is the default grid (per channel, dynamic activations), not all-false fields."""
    return Recipe(
        method=method_from_proto(msg.method),
        scheme=scheme_from_proto(msg.scheme),
        gptq=gptq_from_proto(msg.gptq),
        awq=awq_from_proto(msg.awq),
        fp8=fp8_scheme_from_proto(msg.fp8) if msg.HasField("fp8") else FP8Scheme(),
        overrides=tuple(
            ModuleOverride(
                pattern=o.pattern,
                scheme=(ggml_scheme_from_proto(o.ggml) if o.HasField("ggml")
                        else scheme_from_proto(o.scheme) if o.HasField("scheme") else None),
                method=method_from_proto(o.method) if o.method != common_pb2.METHOD_UNSPECIFIED else None,
                skip=o.skip,
            )
            for o in msg.overrides
        ),
    )


def tensor_ref_to_proto(ref: TensorRef) -> common_pb2.TensorRef:
    return common_pb2.TensorRef(
        key=ref.key, name=ref.name, dtype=ref.dtype, shape=list(ref.shape), sha256=ref.sha256
    )


def tensor_ref_from_proto(msg: common_pb2.TensorRef) -> TensorRef:
    if not msg.key or not msg.name:
        raise ConfigError("a tensor reference needs a store key and a tensor name")
    return TensorRef(key=msg.key, name=msg.name, dtype=msg.dtype, shape=tuple(msg.shape), sha256=msg.sha256)


def quantized_ref_to_proto(name: str, ref: StoredWeight) -> common_pb2.QuantizedRef:
    """`name` is the full module name of the linear the stored weight belongs to."""
    if isinstance(ref, GGMLRef):
        return common_pb2.QuantizedRef(name=name, blocks=tensor_ref_to_proto(ref.blocks),
                                       ggml=ggml_scheme_to_proto(ref.scheme), in_features=ref.in_features)
    if isinstance(ref, FP8Ref):
        msg = common_pb2.QuantizedRef(name=name, fp8_data=tensor_ref_to_proto(ref.data),
                                      fp8_scale=tensor_ref_to_proto(ref.scale), fp8=fp8_scheme_to_proto(ref.scheme))
        if ref.input_scale is not None:
            msg.fp8_input_scale.CopyFrom(tensor_ref_to_proto(ref.input_scale))
        return msg
    return common_pb2.QuantizedRef(
        name=name,
        codes=tensor_ref_to_proto(ref.codes),
        scales=tensor_ref_to_proto(ref.scales),
        zeros=tensor_ref_to_proto(ref.zeros),
        g_idx=tensor_ref_to_proto(ref.g_idx),
        scheme=scheme_to_proto(ref.scheme),
    )


def quantized_ref_from_proto(msg: common_pb2.QuantizedRef) -> StoredWeight:
    if msg.HasField("ggml"):
        return GGMLRef(blocks=tensor_ref_from_proto(msg.blocks), scheme=ggml_scheme_from_proto(msg.ggml),
                       in_features=msg.in_features)
    if msg.HasField("fp8"):
        return FP8Ref(data=tensor_ref_from_proto(msg.fp8_data), scale=tensor_ref_from_proto(msg.fp8_scale),
                      input_scale=tensor_ref_from_proto(msg.fp8_input_scale) if msg.HasField("fp8_input_scale")
                      else None, scheme=fp8_scheme_from_proto(msg.fp8))
    return QuantizedRef(
        codes=tensor_ref_from_proto(msg.codes),
        scales=tensor_ref_from_proto(msg.scales),
        zeros=tensor_ref_from_proto(msg.zeros),
        g_idx=tensor_ref_from_proto(msg.g_idx),
        scheme=scheme_from_proto(msg.scheme),
    )


_FORMATS = {
    Format.GPTQ: common_pb2.FORMAT_GPTQ,
    Format.ONNX: common_pb2.FORMAT_ONNX,
    Format.MLX: common_pb2.FORMAT_MLX,
    Format.AWQ: common_pb2.FORMAT_AWQ,
    Format.COMPRESSED_TENSORS: common_pb2.FORMAT_COMPRESSED_TENSORS,
    Format.GGUF: common_pb2.FORMAT_GGUF,
    Format.MODELOPT: common_pb2.FORMAT_MODELOPT,
    Format.TRTLLM: common_pb2.FORMAT_TRTLLM,
}


def format_to_proto(fmt: Format) -> common_pb2.Format:
    return _FORMATS[fmt]


def format_from_proto(value: int) -> Format:
    for fmt, proto in _FORMATS.items():
        if proto == value:
            return fmt
    raise ConfigError(f"unknown or unspecified format {value}; known: {[f.value for f in Format]}")


def eval_result_from_proto(msg: common_pb2.EvalResult) -> DatasetResult:
    """An artifact's quality on one file; the measures the message lacks are None."""
    optional = {name: getattr(msg, name) if msg.HasField(name) else None
                for name in ("kl", "top1", "reference_ppl", "tokens_per_s")}
    return DatasetResult(dataset=msg.dataset, ppl=msg.ppl, tokens=msg.tokens, **optional)


def eval_result_to_proto(result: DatasetResult) -> common_pb2.EvalResult:
    return common_pb2.EvalResult(dataset=result.dataset, ppl=result.ppl, tokens=result.tokens, kl=result.kl,
                                 top1=result.top1, reference_ppl=result.reference_ppl,
                                 tokens_per_s=result.tokens_per_s)


def artifact_name(artifact: common_pb2.Artifact) -> str:
    """``gptq`` or ``gguf:Q4_K_M``: how messages and reports name an artifact (GGUF by its mix)."""
    name = format_from_proto(artifact.format).value
    return f"{name}:{artifact.variant}" if artifact.variant and artifact.format == common_pb2.FORMAT_GGUF else name


def usage_to_proto(device: torch.device | None = None) -> common_pb2.ResourceUsage:
    """This process's peak host memory and `device`'s peak allocation so far, as workers report them
    (no device: a process that computes on the host only)."""
    from bitsmith.devices import peak_host_bytes, peak_memory_bytes

    if device is None:
        return common_pb2.ResourceUsage(device="cpu", peak_host_bytes=peak_host_bytes())
    return common_pb2.ResourceUsage(device=str(device), peak_host_bytes=peak_host_bytes(),
                                    peak_device_bytes=peak_memory_bytes(device))
