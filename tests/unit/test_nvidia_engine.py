"""The NVIDIA engine on a machine without a GPU: artifacts load with their quantized linears swapped for
kernel modules (running the torch twins), score as their dequantized weights say, and generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bitsmith.demo import CALIB_FILES, DEMO_MODEL
from bitsmith.errors import UnsupportedError
from bitsmith.formats import get_format
from bitsmith.kernels.linear import FP8Linear, WNA16Linear
from bitsmith.manifest import build_artifact
from bitsmith.nvidia import load_kernel_model
from bitsmith.pipeline import quantize_in_process
from bitsmith.recipes import ModuleOverride, Recipe
from bitsmith.runtimes import GenerationStats, Target, load_model, load_reference
from bitsmith.schemes import Format, FP8Scheme, GPTQOptions, Method, QuantScheme

IDS = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(3))


def _write(root: Path, name: str, fmt: Format, recipe: Recipe, **options: object) -> Path:
    quantized = quantize_in_process(DEMO_MODEL, calib_files=CALIB_FILES, samples=4, seq_len=64, recipe=recipe).quantized
    writer = get_format(fmt).write
    out = root / name
    build_artifact(out, lambda d: writer(d, source_model_dir=DEMO_MODEL, quantized=quantized,
                                         options=recipe.gptq, **options), format=fmt, recipe={})
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nvidia")
    act_order = GPTQOptions(act_order=True, static_groups=False)
    return {
        # act-order without static groups: g_idx is not monotone, so the kernel layout carries a permutation.
        "gptq-act-order": _write(root, "gptq-act-order", Format.GPTQ,
                                 Recipe(method=Method.GPTQ, scheme=QuantScheme(bits=4, group_size=64), gptq=act_order),
                                 variant="gptq_v2"),
        # mixed precision: attention at 8 bits per channel, the MLP at 4 bits in groups of 128, sym.
        "gptq-mixed": _write(root, "gptq-mixed", Format.GPTQ, Recipe(
            method=Method.RTN, scheme=QuantScheme(bits=4, group_size=128, sym=True),
            overrides=(ModuleOverride(pattern=r"self_attn\.", scheme=QuantScheme(bits=8, group_size=-1, sym=True)),)),
                             variant="gptq_v2"),
        "awq": _write(root, "awq", Format.AWQ, Recipe(method=Method.RTN, scheme=QuantScheme(bits=4, group_size=64))),
        "compressed-tensors": _write(root, "ct", Format.COMPRESSED_TENSORS,
                                     Recipe(method=Method.RTN, scheme=QuantScheme(bits=4, group_size=32))),
    }


def _linears(engine: torch.nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in engine.named_modules() if isinstance(m, WNA16Linear | FP8Linear)}


@pytest.mark.parametrize("name", ["gptq-act-order", "gptq-mixed", "awq", "compressed-tensors"])
def test_integer_artifacts_run_on_kernel_modules_and_match_their_dequantized_weights(
        artifacts: dict[str, Path], name: str) -> None:
    engine = load_kernel_model(artifacts[name], device="cpu")
    assert len(_linears(engine)) == 28 and set(_linears(engine).values()) == {WNA16Linear}
    assert not any(isinstance(m, torch.nn.Linear) and "layers" in n for n, m in engine.named_modules())
    reference = load_reference(artifacts[name])
    with torch.no_grad():
        got, want = engine(IDS).logits, reference(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert engine.scored().tokens == IDS.numel() and engine.scored().seconds > 0


def test_an_unquantized_checkpoint_runs_as_is_and_generation_reports_its_speed() -> None:
    engine = load_model(DEMO_MODEL, target=Target.NVIDIA)
    assert not _linears(engine)
    pieces = list(engine.generate("Once upon a time", 12, lambda: False))
    *text, stats = pieces
    assert isinstance(stats, GenerationStats) and all(isinstance(t, str) for t in text)
    assert stats.generated_tokens == len(text) <= 12 and stats.prompt.tokens > 0
    assert stats.decode.tokens == max(stats.generated_tokens - 1, 0) or stats.generated_tokens < 12
    reference = load_reference(DEMO_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(engine(IDS).logits, reference(IDS).logits)


def test_a_format_no_nvidia_engine_runs_is_refused_by_name(tmp_path: Path) -> None:
    recipe = Recipe(method=Method.RTN, scheme=QuantScheme(bits=4, group_size=64))
    onnx = _write(tmp_path, "onnx", Format.ONNX, recipe)
    with pytest.raises(UnsupportedError, match="the nvidia runtime runs"):
        load_model(onnx, target=Target.NVIDIA)


@pytest.mark.parametrize(("fmt", "scheme"), [
    (Format.COMPRESSED_TENSORS, FP8Scheme(per_channel=True, static_activations=False)),
    (Format.COMPRESSED_TENSORS, FP8Scheme(per_channel=False, static_activations=True)),
    (Format.MODELOPT, FP8Scheme(per_channel=False, static_activations=True)),
    (Format.TRTLLM, FP8Scheme(per_channel=False, static_activations=True)),
])
def test_fp8_linears_quantize_their_activations(tmp_path: Path, fmt: Format, scheme: FP8Scheme) -> None:
    """An FP8 artifact's linears cast activations to FP8: close to, but not equal to, the FP8 weights
    run in float (each format is recognised by its files alone, TensorRT-LLM's by its own config)."""
    path = _write(tmp_path, "fp8", fmt, Recipe(method=Method.FP8, fp8=scheme))
    engine = load_model(path, target=Target.NVIDIA)
    assert set(_linears(engine).values()) == {FP8Linear}
    static = [m.input_scale is not None for m in engine.modules() if isinstance(m, FP8Linear)]
    assert all(static) if scheme.static_activations else not any(static)
    reference = load_reference(path)
    with torch.no_grad():
        got, want = engine(IDS).logits, reference(IDS).logits
    assert not torch.equal(got, want)
    assert float((got - want).norm() / want.norm()) < 0.05


@pytest.mark.parametrize("fmt", [Format.MODELOPT, Format.TRTLLM])
def test_int4_nvidia_checkpoints_run_on_the_w4a16_kernel(tmp_path: Path, fmt: Format) -> None:
    recipe = Recipe(method=Method.RTN, scheme=QuantScheme(bits=4, group_size=128, sym=True))
    path = _write(tmp_path, "w4", fmt, recipe)
    engine = load_model(path, target=Target.NVIDIA)
    assert set(_linears(engine).values()) == {WNA16Linear}
    with torch.no_grad():
        torch.testing.assert_close(engine(IDS).logits, load_reference(path)(IDS).logits, rtol=1e-4, atol=1e-4)


def test_the_engine_keeps_one_model_loaded_until_its_files_change(artifacts: dict[str, Path]) -> None:
    path = artifacts["gptq-mixed"]
    first = load_model(path, target=Target.NVIDIA)
    assert load_model(path, target=Target.NVIDIA) is first
    other = load_model(artifacts["gptq-act-order"], target=Target.NVIDIA)
    assert other is not first and load_model(path, target=Target.NVIDIA) is not first  # one at a time
    config = path / "config.json"
    again = load_model(path, target=Target.NVIDIA)
    config.write_text(config.read_text())  # same bytes, new time: read again
    assert load_model(path, target=Target.NVIDIA) is not again


def test_an_fp8_compressed_tensors_file_runs_on_nvidia_unless_told_otherwise(tmp_path: Path) -> None:
    """Its home target would be the CPU's torch engine, which would score the FP8 weights alone; with FP8
    linears it goes where activations are cast too. Integer files stay on the CPU."""
    from bitsmith.nvidia import KernelEngine
    from bitsmith.runtimes import home_target

    fp8 = _write(tmp_path, "fp8", Format.COMPRESSED_TENSORS, Recipe(method=Method.FP8))
    int4 = _write(tmp_path, "int4", Format.COMPRESSED_TENSORS, Recipe(method=Method.RTN, scheme=QuantScheme(bits=4)))
    assert home_target(fp8, Format.COMPRESSED_TENSORS) is Target.NVIDIA
    assert home_target(int4, Format.COMPRESSED_TENSORS) is Target.CPU
    assert isinstance(load_model(fp8), KernelEngine)
    assert not isinstance(load_model(fp8, target=Target.CPU), KernelEngine)


def test_the_nvidia_target_compares_against_the_reference_on_its_own_engine(tmp_path: Path) -> None:
    """KL and the reference perplexity come from the unquantized model loaded by the NVIDIA engine (on a GPU:
    bf16 beside the artifact, not a float32 copy on the host); on a CPU its numbers are the float32 model's."""
    from bitsmith.demo import EVAL_FILES
    from bitsmith.runtimes import _device_reference, evaluate_path

    sample = tmp_path / "sample.txt"
    sample.write_text(EVAL_FILES[0].read_text(encoding="utf-8")[:2000], encoding="utf-8")
    path = _write(tmp_path, "fp8", Format.COMPRESSED_TENSORS, Recipe(method=Method.FP8))
    _device_reference.cache_clear()
    (result,) = evaluate_path(path, [sample], seq_len=128, reference=DEMO_MODEL, target=Target.NVIDIA)
    assert _device_reference.cache_info().currsize == 1
    (plain,) = evaluate_path(DEMO_MODEL, [sample], seq_len=128, target=Target.CPU)
    assert result.reference_ppl == pytest.approx(plain.ppl, rel=1e-5)
    assert result.kl is not None and 0 < result.kl < 0.01
