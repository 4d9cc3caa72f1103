"""Calibration on CUDA with the model on the host: one block on the GPU at a time.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest tests/gpu -q`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bitsmith.calib import forward_block
from bitsmith.devices import MatmulPrecision
from bitsmith.errors import ConfigError
from bitsmith.models import load_checkpoint
from bitsmith.pipeline import collect_stats
from bitsmith_services.calibrator.activations import fits_on_device
from bitsmith_services.registry import Activations, ServiceOptions

from tests.unit.test_block_residency import random_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_blocks_match_the_cpu_and_leave_activations_on_the_host(tmp_path: Path) -> None:
    model_dir = random_llama(tmp_path / "m", layers=2, hidden=256, ffn=512)
    cpu, gpu = load_checkpoint(model_dir), load_checkpoint(model_dir, device="cuda")
    hidden = cpu.embed(torch.randint(0, 1000, (6, 64), generator=torch.Generator().manual_seed(1)))
    assert gpu.embed(torch.zeros(1, 2, dtype=torch.long)).device.type == "cpu"
    for bid in range(2):
        names = [n for group in cpu.groups(bid) for n in group]
        want, got = collect_stats(cpu, bid, names, hidden, {}), collect_stats(gpu, bid, names, hidden, {})
        for name in names:
            torch.testing.assert_close(got[name][0].cpu(), want[name][0], rtol=1e-4, atol=1e-5)
        out = forward_block(gpu, bid, hidden, chunk=4)
        assert out.device.type == "cpu" and out.is_pinned()
        torch.testing.assert_close(out, forward_block(cpu, bid, hidden, chunk=4), rtol=1e-4, atol=1e-5)
        hidden = out


def test_peak_gpu_memory_follows_one_block_not_the_depth(tmp_path: Path) -> None:
    peaks = {}
    for layers in (2, 6):
        model_dir = random_llama(tmp_path / f"m{layers}", layers=layers, hidden=1024, ffn=4096)
        model = load_checkpoint(model_dir, device="cuda")
        hidden = model.embed(torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(0)))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for bid in range(layers):
            names = [n for group in model.groups(bid) for n in group]
            collect_stats(model, bid, names, hidden, {})
            hidden = forward_block(model, bid, hidden)
        peaks[layers] = torch.cuda.max_memory_allocated() - base
        del model
        torch.cuda.empty_cache()
    assert peaks[6] <= 1.05 * peaks[2], peaks


def test_device_activations_stay_on_the_gpu_and_equal_the_host_path(tmp_path: Path) -> None:
    model_dir = random_llama(tmp_path / "m", layers=1, hidden=256, ffn=512)
    model = load_checkpoint(model_dir, device="cuda", compute_dtype=torch.bfloat16)
    hidden = model.embed(torch.randint(0, 1000, (6, 64), generator=torch.Generator().manual_seed(2)))
    assert hidden.dtype is torch.bfloat16
    on_device = forward_block(model, 0, fits_on_device(hidden, torch.device("cuda")), chunk=4)
    assert on_device.is_cuda and on_device.dtype is torch.bfloat16
    assert torch.equal(on_device.cpu(), forward_block(model, 0, hidden, chunk=4))


def test_a_calibration_set_too_large_for_the_gpu_is_refused_up_front() -> None:
    huge = torch.zeros((), dtype=torch.bfloat16).expand(1 << 20, 1 << 20)  # 2 TiB, none of it allocated
    with pytest.raises(ConfigError, match=r"do not fit in the .* GiB free on cuda.*--activations host"):
        fits_on_device(huge, torch.device("cuda"))


def test_a_job_with_activations_on_the_gpu_writes_the_host_ones_artifact(tmp_path: Path) -> None:
    """`--activations device` changes where activations wait between blocks, nothing computed: a sequential
    job with asymmetric calibration (two streams held) writes the same checkpoint, bit for bit."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from tests.integration.conftest import make_request, running_stack

    written = {}
    for mode in (Activations.HOST, Activations.DEVICE):
        stacks = running_stack(tmp_path / mode.value, calibrator=ServiceOptions(
            activations=mode, matmul_precision=MatmulPrecision.BFLOAT16))
        stack = next(stacks)
        try:
            request = make_request(tmp_path / f"out-{mode.value}", samples=16, seq_len=256)
            request = replace(request, recipe=replace(request.recipe, gptq=replace(
                request.recipe.gptq, asymmetric_calibration=True)))
            done = stack.client.submit(request).wait()
            (artifact,) = done.artifacts
            written[mode] = load_file(str(Path(artifact.path) / "model.safetensors"))
        finally:
            stacks.close()
    host, device = written[Activations.HOST], written[Activations.DEVICE]
    assert host.keys() == device.keys()
    assert all(torch.equal(host[name], device[name]) for name in host)
