"""An ONNX artifact run by ONNX Runtime, behind the calling convention of a transformers causal LM.

Why a torch-shaped wrapper: `bitsmith.evaluate` and `bitsmith.runtimes.generate_greedy` drive every
target the same way — ``model(input_ids, past_key_values=..., use_cache=...)`` returning ``.logits``
and ``.past_key_values`` — so the ONNX target reuses the exact scoring and decoding code that the torch
targets use. The weights live in the ONNX Runtime session; the KV cache is the graph's own
``present.*`` outputs fed back as ``past_key_values.*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bitsmith.errors import FormatError
from bitsmith.formats.onnx.constants import INPUT_IDS, LOGITS, PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE
from bitsmith.formats.onnx.reader import read_onnx

PROVIDERS = ("CPUExecutionProvider",)


@dataclass(frozen=True, slots=True)
class CausalOutput:
    """What a forward returns: logits [batch, seq, vocab] and the cache to pass back next step."""

    logits: torch.Tensor
    past_key_values: dict[str, np.ndarray] | None


class OnnxCausalLM(torch.nn.Module):
    """An ONNX Runtime session over a validated artifact (see the module docstring)."""

    def __init__(self, path: Path, *, threads: int = 0) -> None:
        import onnxruntime as ort

        super().__init__()
        checkpoint = read_onnx(path)  # validate before ORT parses anything
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(checkpoint.model_file), options, providers=list(PROVIDERS))
        except (RuntimeError, ValueError) as e:  # ORT's Fail / InvalidGraph derive from RuntimeError
            raise FormatError(f"{checkpoint.model_file}: ONNX Runtime cannot load it: {e}") from e
        self._cache_inputs = [i for i in self.session.get_inputs() if i.name != INPUT_IDS]
        self._outputs = [o.name for o in self.session.get_outputs()]
        # ORT holds the weights; this empty parameter tells torch-side callers the model lives on the CPU.
        self.anchor = torch.nn.Parameter(torch.empty(0), requires_grad=False)

    def _empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        cache = {}
        for spec in self._cache_inputs:
            _, heads, _, head_dim = spec.shape
            cache[spec.name] = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
        return cache

    def forward(self, input_ids: torch.Tensor, past_key_values: dict[str, np.ndarray] | None = None,
                use_cache: bool = False) -> CausalOutput:
        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        feed = {INPUT_IDS: ids, **(past_key_values or self._empty_cache(ids.shape[0]))}
        results = dict(zip(self._outputs, self.session.run(self._outputs, feed), strict=True))
        logits = torch.from_numpy(results.pop(LOGITS))
        if not use_cache:
            return CausalOutput(logits=logits, past_key_values=None)
        cache = {}
        for past, present in ((PAST_KEY, PRESENT_KEY), (PAST_VALUE, PRESENT_VALUE)):
            for layer in range(len(self._cache_inputs) // 2):
                cache[past.format(layer=layer)] = results[present.format(layer=layer)]
        return CausalOutput(logits=logits, past_key_values=cache)
