"""An MLX artifact run by mlx through mlx-lm's model code, behind a transformers-style calling convention.

Why mlx-lm's models: they are what an Apple user runs (`mlx_lm.load`), so executing the artifact with
them proves the layout end to end — `nn.quantize` turns every module that has `.scales` into a
`QuantizedLinear` calling `mx.quantized_matmul`, with its own bits and group size where config.json's
`quantization` block has an entry for its path (mixed precision), and leaves a linear stored without
`.scales` (kept in float) an `nn.Linear`. On Linux this is mlx's CPU backend (`mlx[cpu]`), on a
Mac the GPU. The wrapper gives `bitsmith.evaluate` and `generate_greedy` the same interface as the
torch and ONNX targets; the KV cache is mlx-lm's prompt cache, updated in place. On the CPU backend the
model computes in float32 (see `MlxCausalLM.__init__`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitsmith.errors import FormatError
from bitsmith.formats.mlx.reader import read_mlx


@dataclass(frozen=True, slots=True)
class CausalOutput:
    """logits [batch, seq, vocab] (float32, torch) and mlx-lm's cache list to pass back next step."""

    logits: torch.Tensor
    past_key_values: list[Any] | None


class MlxCausalLM(torch.nn.Module):
    """mlx-lm's model of a validated MLX artifact (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        from mlx_lm.utils import load_model

        super().__init__()
        read_mlx(path)  # validate before mlx-lm trusts the files
        try:
            self.model, _ = load_model(Path(path))
        except (ValueError, KeyError) as e:
            raise FormatError(f"{path}: mlx-lm cannot load it: {e}") from e
        import mlx.core as mx

        if mx.default_device() == mx.cpu:
            # float16 arithmetic on mlx's CPU backend is emulated: ~10x slower and noisier. The stored
            # codes, scales and biases are unchanged; only activations are float32 off-GPU.
            self.model.set_dtype(mx.float32)
        # mlx holds the weights; this empty parameter tells torch-side callers the inputs belong on the CPU.
        self.anchor = torch.nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, past_key_values: list[Any] | None = None,
                use_cache: bool = False) -> CausalOutput:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = past_key_values if past_key_values is not None else (
            make_prompt_cache(self.model) if use_cache else None)
        logits = self.model(mx.array(input_ids.detach().cpu().numpy().astype(np.int32)), cache=cache)
        out = torch.from_numpy(np.array(logits.astype(mx.float32)))
        return CausalOutput(logits=out, past_key_values=cache if use_cache else None)
