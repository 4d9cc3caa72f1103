"""Read and validate an ONNX MatMulNBits artifact, giving back our codes (FORMATS.md §7, checklist §8).

Why the reader checks before ONNX Runtime sees the file: ORT's errors on a bad graph name neither the
layer nor the artifact, and a graph can point its external data anywhere on disk. So: config.json's
`quantization_config` first; then the protobuf parses (no external data yet), its opsets are the ones
we write, every external initializer lives in `model.onnx.data` inside its bounds with exactly the
bytes its shape needs; then `onnx.checker`; then every MatMulNBits node's attributes agree with its
own scheme in the config (its `modules` entry, else the global scheme; layout in `writer.py`) and its
B / scales / zero points have the shapes and dtypes those attributes imply; every `modules` entry names
a MatMulNBits node and every `not_quantized` linear is a float MatMul of its own `.weight`. Only then
are codes unpacked. Anything off is a `FormatError` naming the file and node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import external_data_helper, helper, numpy_helper

from bitsmith.errors import FormatError, NotFoundError
from bitsmith.formats.base import dense_state, read_json_object
from bitsmith.formats.onnx.constants import (
    BIAS,
    BITS,
    BLOCK_SIZES,
    CONFIG_FILE,
    DATA_FILE,
    INPUT_IDS,
    LOGITS,
    MATMUL_NBITS,
    MAX_GRAPH_NODES,
    MODEL_FILE,
    MODULES_KEY,
    MS_DOMAIN,
    MS_OPSET,
    NOT_QUANTIZED_KEY,
    OPSET,
    QUANT_METHOD,
    QUANTIZATION_CONFIG_KEY,
    SCHEME_KEYS,
    WEIGHT,
)
from bitsmith.formats.onnx.packing import blob_size, unpack_codes, unpack_zero_points, zero_point_bytes
from bitsmith.quantized import QuantizedWeight
from bitsmith.schemes import QuantScheme

# MatMulNBits input slots (ORT contrib schema).
_A, _B, _SCALES, _ZERO_POINTS, _G_IDX, _BIAS = range(6)


@dataclass(frozen=True, slots=True, kw_only=True)
class OnnxCheckpoint:
    """A validated ONNX artifact: its config, the codes of every MatMulNBits node (each with its own
    scheme; `scheme` is the global one), the block linears kept in float, and its float tensors."""

    path: Path
    config: Mapping[str, Any]
    scheme: QuantScheme
    quantized: Mapping[str, QuantizedWeight]
    not_quantized: tuple[str, ...]
    tensors: Mapping[str, torch.Tensor]

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    def dense_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """HF-named float state dict: each MatMulNBits node's weight dequantized."""
        return dense_state(self.tensors, self.quantized, dtype)


@dataclass(frozen=True, slots=True, kw_only=True)
class _QuantConfig:
    scheme: QuantScheme
    modules: Mapping[str, QuantScheme]
    not_quantized: tuple[str, ...]


def _scheme(where: str, fields: Mapping[str, Any]) -> QuantScheme:
    bits, group_size, sym = (fields.get(key) for key in SCHEME_KEYS)
    if type(bits) is not int or bits not in BITS:
        raise FormatError(f"{where}: bits must be one of {BITS}, got {bits!r}")
    if type(group_size) is not int or group_size not in BLOCK_SIZES:
        raise FormatError(f"{where}: group_size must be one of {BLOCK_SIZES}, got {group_size!r}")
    if type(sym) is not bool:
        raise FormatError(f"{where}: sym must be true/false, got {sym!r}")
    return QuantScheme(bits=bits, group_size=group_size, sym=sym)


def _config(path: Path) -> tuple[dict[str, Any], _QuantConfig]:
    config_path = path / CONFIG_FILE
    config = read_json_object(config_path, missing=f"ONNX artifact {path} has no {CONFIG_FILE}")
    qcfg = config.get(QUANTIZATION_CONFIG_KEY) if isinstance(config, dict) else None
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"{config_path}: {QUANTIZATION_CONFIG_KEY}.quant_method is not {QUANT_METHOD!r}")
    scheme = _scheme(str(config_path), qcfg)
    entries = qcfg.get(MODULES_KEY, {})
    if not isinstance(entries, dict):
        raise FormatError(f"{config_path}: {MODULES_KEY} must map node names to schemes, got {entries!r}")
    modules = {}
    for name, fields in sorted(entries.items()):
        where = f"{config_path}: {MODULES_KEY}[{name!r}]"
        if not isinstance(fields, dict) or set(fields) != set(SCHEME_KEYS):
            raise FormatError(f"{where} must be an object with exactly {list(SCHEME_KEYS)}, got {fields!r}")
        modules[name] = _scheme(where, fields)
    floats = qcfg.get(NOT_QUANTIZED_KEY, [])
    if not isinstance(floats, list) or not all(isinstance(n, str) for n in floats) or len(set(floats)) != len(floats):
        raise FormatError(f"{config_path}: {NOT_QUANTIZED_KEY} must be a list of distinct names, got {floats!r}")
    if both := sorted(set(floats) & set(modules)):
        raise FormatError(f"{config_path}: {both[:3]} are both in {MODULES_KEY} and {NOT_QUANTIZED_KEY}")
    return config, _QuantConfig(scheme=scheme, modules=modules, not_quantized=tuple(floats))


def _load_graph(path: Path) -> onnx.ModelProto:
    """Parse the protobuf, check opsets and external data bounds, load the data, run onnx.checker."""
    model_path = path / MODEL_FILE
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except FileNotFoundError as e:
        raise NotFoundError(f"ONNX artifact {path} has no {MODEL_FILE}") from e
    except (DecodeError, ValueError, RuntimeError) as e:
        raise FormatError(f"{model_path}: not a readable ONNX model (truncated or corrupt): {e}") from e
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("") != OPSET or opsets.get(MS_DOMAIN) != MS_OPSET:
        raise FormatError(f"{model_path}: opsets {opsets}, expected '' = {OPSET} and {MS_DOMAIN} = {MS_OPSET}")
    if len(model.graph.node) > MAX_GRAPH_NODES:
        raise FormatError(f"{model_path}: {len(model.graph.node)} nodes is past the limit {MAX_GRAPH_NODES}")
    _check_external_data(model, path)
    external_data_helper.load_external_data_for_model(model, str(path))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise FormatError(f"{model_path}: onnx.checker rejects the graph: {e}") from e
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if not inputs or inputs[0] != INPUT_IDS or not outputs or outputs[0] != LOGITS:
        raise FormatError(f"{model_path}: graph inputs {inputs[:1]} / outputs {outputs[:1]}, "
                          f"expected {INPUT_IDS!r} / {LOGITS!r} first")
    return model


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    data_path = path / DATA_FILE
    data_size = data_path.stat().st_size if data_path.is_file() else None
    for tensor in model.graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            continue
        where = f"{path / MODEL_FILE}: initializer {tensor.name!r}"
        info = {entry.key: entry.value for entry in tensor.external_data}
        if info.get("location") != DATA_FILE:
            raise FormatError(f"{where} points at {info.get('location')!r}, not {DATA_FILE!r}")
        if data_size is None:
            raise FormatError(f"{where}: {DATA_FILE} is missing")
        try:
            offset, length = int(info.get("offset", "0")), int(info["length"])
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, ValueError, TypeError) as e:
            raise FormatError(f"{where}: bad external data record {info}: {e}") from e
        needed = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
        if offset < 0 or length != needed or offset + length > data_size:
            raise FormatError(f"{where}: bytes [{offset}, {offset + length}) of a {data_size}-byte {DATA_FILE}, "
                              f"shape {list(tensor.dims)} needs {needed}")


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _array(initializers: Mapping[str, onnx.TensorProto], name: str, where: str, dtype: type,
           shape: tuple[int, ...]) -> np.ndarray:
    tensor = initializers.get(name)
    if tensor is None:
        raise FormatError(f"{where}: input {name!r} is not an initializer")
    array = numpy_helper.to_array(tensor)
    if array.dtype != dtype or array.shape != shape:
        raise FormatError(f"{where}: {name!r} is {array.dtype} {list(array.shape)}, expected "
                          f"{np.dtype(dtype)} {list(shape)}")
    return array


def _unpack_node(node: onnx.NodeProto, initializers: Mapping[str, onnx.TensorProto], scheme: QuantScheme,
                 where: str) -> tuple[QuantizedWeight, np.ndarray | None]:
    """The codes of one MatMulNBits node, checked against `scheme` (its own scheme in config.json)."""
    attrs = _attrs(node)
    expected = {"bits": scheme.bits, "block_size": scheme.group_size}
    if any(attrs.get(key) != value for key, value in expected.items()):
        raise FormatError(f"{where}: attributes {attrs} disagree with config.json {expected}")
    k, n = attrs.get("K"), attrs.get("N")
    if type(k) is not int or type(n) is not int or k <= 0 or n <= 0 or k % scheme.group_size:
        raise FormatError(f"{where}: K={k!r}, N={n!r} must be positive and K a multiple of {scheme.group_size}")
    inputs = list(node.input) + [""] * (_BIAS + 1 - len(node.input))
    if inputs[_G_IDX]:
        raise FormatError(f"{where}: g_idx input is set; bitsmith writes contiguous blocks only")
    blocks = k // scheme.group_size
    packed = _array(initializers, inputs[_B], where, np.uint8, (n, blocks, blob_size(scheme.bits, scheme.group_size)))
    scales = _array(initializers, inputs[_SCALES], where, np.float32, (n, blocks))
    if scheme.sym:
        if inputs[_ZERO_POINTS]:
            raise FormatError(f"{where}: symmetric config but the node has zero points")
        zeros = np.full((n, blocks), 1 << (scheme.bits - 1), dtype=np.int32)
    else:
        stored = _array(initializers, inputs[_ZERO_POINTS], where, np.uint8, (n, zero_point_bytes(blocks, scheme.bits)))
        zeros = unpack_zero_points(stored, scheme.bits, blocks).astype(np.int32)
    bias = _array(initializers, inputs[_BIAS], where, np.float32, (n,)) if inputs[_BIAS] else None
    qw = QuantizedWeight(
        codes=torch.from_numpy(unpack_codes(packed, scheme.bits)),
        scales=torch.from_numpy(scales.copy()),
        zeros=torch.from_numpy(zeros),
        g_idx=torch.arange(k, dtype=torch.int32) // scheme.group_size,
        scheme=scheme,
    )
    return qw, bias


def read_onnx(path: Path) -> OnnxCheckpoint:
    """Validate the ONNX artifact at `path` and return its codes and float tensors."""
    path = Path(path)
    config, qcfg = _config(path)
    model = _load_graph(path)
    initializers = {t.name: t for t in model.graph.initializer}
    if len(initializers) != len(model.graph.initializer):
        raise FormatError(f"{path / MODEL_FILE}: duplicate initializer names")
    quantized: dict[str, QuantizedWeight] = {}
    tensors: dict[str, torch.Tensor] = {}
    owned: set[str] = set()
    for node in model.graph.node:
        if node.op_type != MATMUL_NBITS:
            continue
        where = f"{path / MODEL_FILE}: node {node.name!r}"
        if node.domain != MS_DOMAIN or not node.name or node.name in quantized:
            raise FormatError(f"{where}: a {MATMUL_NBITS} node needs domain {MS_DOMAIN!r} and a unique name")
        scheme = qcfg.modules.get(node.name, qcfg.scheme)
        quantized[node.name], bias = _unpack_node(node, initializers, scheme, where)
        owned.update(node.input[1:])
        if bias is not None:
            tensors[f"{node.name}.{BIAS}"] = torch.from_numpy(bias.copy())
    if not quantized:
        raise FormatError(f"{path / MODEL_FILE}: the graph has no {MATMUL_NBITS} node")
    if unknown := sorted(set(qcfg.modules) - set(quantized)):
        raise FormatError(f"{path / CONFIG_FILE}: {MODULES_KEY} names {unknown[:3]}, which are not "
                          f"{MATMUL_NBITS} nodes of the graph")
    _check_float_linears(model, qcfg.not_quantized, initializers, path)
    for name, tensor in initializers.items():
        if name not in owned and name.endswith((f".{WEIGHT}", f".{BIAS}")):
            tensors[name] = torch.from_numpy(numpy_helper.to_array(tensor).copy())
    return OnnxCheckpoint(path=path, config=config, scheme=qcfg.scheme, quantized=quantized,
                          not_quantized=qcfg.not_quantized, tensors=tensors)


def _check_float_linears(model: onnx.ModelProto, names: tuple[str, ...],
                         initializers: Mapping[str, onnx.TensorProto], path: Path) -> None:
    """Each linear config.json says is float is a MatMul node of that name reading its own 2-D `.weight`."""
    producers = {out: node for node in model.graph.node for out in node.output}
    by_name = {node.name: node for node in model.graph.node}
    for name in names:
        node = by_name.get(name)
        where = f"{path / CONFIG_FILE}: {NOT_QUANTIZED_KEY} linear {name!r}"
        if node is None or node.op_type != "MatMul" or len(node.input) != 2:
            found = "no node" if node is None else f"a {node.op_type} node"
            raise FormatError(f"{where}: the graph has {found} of that name, expected a float MatMul")
        weight = f"{name}.{WEIGHT}"
        transpose, tensor = producers.get(node.input[1]), initializers.get(weight)
        reads = transpose is not None and transpose.op_type == "Transpose" and list(transpose.input) == [weight]
        if not reads or tensor is None or len(tensor.dims) != 2:
            raise FormatError(f"{where}: its MatMul does not read the float initializer {weight!r}")

