"""Perplexity, KL divergence and top-1 agreement of a causal LM, by the reference models' protocol.

The token stream is cut into consecutive non-overlapping windows of `seq_len` (the last, shorter
one kept); each window is scored on its own, so a window of n tokens gives n - 1 predictions.
Perplexity is exp(total NLL / predictions), all in float32. With a `reference` model, KL(reference ‖
model) and top-1 agreement are averaged over the same predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bitsmith.calib.data import tokenize_file
from bitsmith.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalResult:
    """ppl = exp(nll); nll is the mean per prediction; kl / top1 / reference_ppl only with a reference model
    (the reference's own perplexity comes from the same forward that KL needs, not a second pass)."""

    ppl: float
    nll: float
    predictions: int
    kl: float | None = None
    top1: float | None = None
    reference_ppl: float | None = None


def _windows(tokens: torch.Tensor, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Batches of windows: full windows `batch_size` at a time, then the shorter tail on its own."""
    full = tokens.numel() // seq_len
    body = tokens[: full * seq_len].reshape(full, seq_len)
    batches = list(body.split(batch_size))
    tail = tokens[full * seq_len :]
    if tail.numel() >= 2:
        batches.append(tail.unsqueeze(0))
    return batches


def _log_probs(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(batch.to(device)).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def evaluate(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    seq_len: int = 512,
    reference: torch.nn.Module | None = None,
    batch_size: int = 8,
) -> EvalResult:
    """Score `model` on the stream `tokens` [T] (and compare with `reference` when given)."""
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    tokens = tokens.reshape(-1).long()
    nll = torch.zeros((), dtype=torch.float64)
    kl = torch.zeros((), dtype=torch.float64)
    ref_nll = torch.zeros((), dtype=torch.float64)
    agree = 0
    count = 0
    with torch.no_grad():
        for batch in _windows(tokens, seq_len, batch_size):
            logp = _log_probs(model, batch)
            targets = batch[:, 1:].to(logp.device)
            nll -= logp.gather(-1, targets.unsqueeze(-1)).sum().double().cpu()
            count += targets.numel()
            if reference is not None:
                ref = _log_probs(reference, batch).to(logp.device)
                kl += (ref.exp() * (ref - logp)).sum().double().cpu()
                ref_nll -= ref.gather(-1, targets.unsqueeze(-1)).sum().double().cpu()
                agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
    if count == 0:
        raise ConfigError(f"{tokens.numel()} tokens give no prediction")
    mean_nll = float(nll) / count
    return EvalResult(
        ppl=math.exp(mean_nll),
        nll=mean_nll,
        predictions=count,
        kl=None if reference is None else float(kl) / count,
        top1=None if reference is None else agree / count,
        reference_ppl=None if reference is None else math.exp(float(ref_nll) / count),
    )


__all__ = ["EvalResult", "evaluate", "tokenize_file"]
