"""The NVIDIA engine on a GPU: artifacts of the demo model loaded with their linears on the Triton W4A16
GEMM and on FP8 tensor cores, scored against their dequantized weights, and generating.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest tests/gpu -q`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bitsmith.decoding import DynamicDecoder, StaticDecoder
from bitsmith.demo import CALIB_FILES, DEMO_MODEL
from bitsmith.formats import get_format
from bitsmith.kernels.linear import FP8Linear, WNA16Linear
from bitsmith.manifest import build_artifact
from bitsmith.nvidia import load_kernel_model
from bitsmith.pipeline import quantize_in_process
from bitsmith.recipes import Recipe
from bitsmith.runtimes import GenerationStats, load_reference
from bitsmith.schemes import Format, FP8Scheme, GPTQOptions, Method, QuantScheme

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

IDS = torch.randint(0, 4096, (4, 128), generator=torch.Generator().manual_seed(5))


def _artifact(root: Path, fmt: Format, recipe: Recipe, variant: str | None = None) -> Path:
    quantized = quantize_in_process(DEMO_MODEL, calib_files=CALIB_FILES, samples=8, seq_len=128, recipe=recipe,
                                    device="cuda").quantized
    writer = get_format(fmt).write
    build_artifact(root, lambda d: writer(d, source_model_dir=DEMO_MODEL, quantized=quantized,
                                          options=recipe.gptq, variant=variant), format=fmt, recipe={})
    return root


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float().cpu() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize(("name", "fmt", "recipe", "variant", "module"), [
    ("w4-gptq", Format.GPTQ, Recipe(method=Method.GPTQ, scheme=QuantScheme(bits=4, group_size=128)), "gptq_v2",
     WNA16Linear),
    ("w4-actorder", Format.GPTQ, Recipe(method=Method.GPTQ, scheme=QuantScheme(bits=4, group_size=64),
                                        gptq=GPTQOptions(act_order=True, static_groups=False)), "gptq_v2",
     WNA16Linear),
    ("w8-channel", Format.COMPRESSED_TENSORS, Recipe(method=Method.RTN, scheme=QuantScheme(bits=8, group_size=-1,
                                                                                          sym=True)), None,
     WNA16Linear),
    ("fp8-dynamic", Format.COMPRESSED_TENSORS, Recipe(method=Method.FP8, fp8=FP8Scheme()), None, FP8Linear),
    ("fp8-static", Format.MODELOPT, Recipe(method=Method.FP8, fp8=FP8Scheme(per_channel=False,
                                                                            static_activations=True)), None,
     FP8Linear),
])
def test_artifacts_run_on_the_gpu_kernels_close_to_their_dequantized_weights(
        tmp_path: Path, name: str, fmt: Format, recipe: Recipe, variant: str | None, module: type) -> None:
    if module is FP8Linear and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9")
    path = _artifact(tmp_path / name, fmt, recipe, variant)
    engine = load_kernel_model(path)
    linears = [m for m in engine.modules() if isinstance(m, WNA16Linear | FP8Linear)]
    assert len(linears) == 28 and all(isinstance(m, module) for m in linears)
    assert all(t.device.type == "cuda" for t in engine.state_dict().values())
    reference = load_reference(path)
    with torch.no_grad():
        got, want = engine(IDS).logits, reference(IDS).logits
    # bf16 activations (and FP8 ones) against the float32 dequantized model: bf16's rounding, not a bug's.
    assert _relative(got, want) < (0.05 if module is FP8Linear else 0.02), name
    agree = float((got.float().cpu().argmax(-1) == want.argmax(-1)).float().mean())
    assert agree > 0.9, name


def test_generation_on_the_gpu_times_prompt_and_decode(tmp_path: Path) -> None:
    path = _artifact(tmp_path / "w4", Format.GPTQ, Recipe(method=Method.RTN, scheme=QuantScheme(bits=4)), "gptq_v2")
    engine = load_kernel_model(path)
    *text, stats = list(engine.generate("Once upon a time", 16, lambda: False))
    assert isinstance(stats, GenerationStats) and "".join(str(t) for t in text)
    assert stats.decode.tokens > 0 and stats.decode.per_second is not None and stats.prompt.tokens > 0


def test_decode_steps_replay_a_cuda_graph_that_computes_the_eager_steps(tmp_path: Path) -> None:
    path = _artifact(tmp_path / "w4", Format.GPTQ, Recipe(method=Method.RTN, scheme=QuantScheme(bits=4)), "gptq_v2")
    engine = load_kernel_model(path)
    prompt = IDS[:1, :20].cuda()
    forced = IDS[1, :24].tolist()  # teacher-forced tokens: a near-tie cannot make the two runs diverge

    def logits(decoder: DynamicDecoder | StaticDecoder) -> torch.Tensor:
        with torch.no_grad():
            rows = [decoder.begin(prompt, len(forced) + 1)]
            rows += [decoder.step(torch.tensor([[token]], device="cuda")) for token in forced]
        return torch.stack(rows).float()

    want = logits(DynamicDecoder(engine.model))
    got = logits(engine.decoder)
    assert engine.decoder.graph is not None and not engine.decoder.capture_failed
    assert _relative(got, want.cpu()) < 1e-2
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) > 0.9
    again = logits(engine.decoder)  # a second sequence replays the same graph on the reset cache
    torch.testing.assert_close(again, got)
