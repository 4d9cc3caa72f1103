"""The evaluation protocol on a model whose log-probabilities are known, and the README's numbers."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytest
import torch
from bitsmith.algos import quantize_rtn
from bitsmith.demo import DEMO_MODEL, EVAL_FILES
from bitsmith.errors import ConfigError
from bitsmith.evaluate import evaluate, tokenize_file
from bitsmith.models import load_causal_lm
from bitsmith.schemes import QuantScheme


@dataclass
class _Output:
    logits: torch.Tensor


class Bigram(torch.nn.Module):
    """logits[t] = table[token t]: every prediction's probability is known in closed form."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, ids: torch.Tensor) -> _Output:
        return _Output(self.table[ids])


def _expected_nll(table: torch.Tensor, tokens: torch.Tensor, seq_len: int) -> tuple[float, int]:
    logp = torch.log_softmax(table.double(), -1)
    total, count = 0.0, 0
    for start in range(0, tokens.numel(), seq_len):
        window = tokens[start : start + seq_len]
        for prev, nxt in zip(window[:-1].tolist(), window[1:].tolist(), strict=True):
            total -= float(logp[prev, nxt])
            count += 1
    return total / count, count


def test_windows_and_nll_match_hand_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(11, 11, generator=gen)
    tokens = torch.randint(0, 11, (103,), generator=gen)
    result = evaluate(Bigram(table), tokens, seq_len=10, batch_size=3)
    nll, count = _expected_nll(table, tokens, 10)
    assert result.predictions == count == 10 * 9 + 2  # ten full windows, a tail of 3 tokens
    assert result.nll == pytest.approx(nll, rel=1e-6) and result.ppl == pytest.approx(math.exp(nll), rel=1e-6)
    assert result.kl is None and result.top1 is None
    # A one-token tail predicts nothing and is dropped.
    assert evaluate(Bigram(table), tokens[:101], seq_len=10).predictions == 90


def test_kl_and_top1_against_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(7, 7, generator=gen)
    other = table.clone()
    other[2] = torch.roll(other[2], 1)
    tokens = torch.randint(0, 7, (60,), generator=gen)
    same = evaluate(Bigram(table), tokens, seq_len=16, reference=Bigram(table))
    assert same.kl == pytest.approx(0.0, abs=1e-7) and same.top1 == 1.0
    diff = evaluate(Bigram(other), tokens, seq_len=16, reference=Bigram(table))
    p, q = torch.log_softmax(table.double(), -1), torch.log_softmax(other.double(), -1)
    prev = torch.cat([w[:-1] for w in tokens.split(16)])
    per_token = (p.exp() * (p - q)).sum(-1)[prev]
    assert diff.kl == pytest.approx(float(per_token.mean()), rel=1e-5)
    agree = (p.argmax(-1) == q.argmax(-1))[prev].double().mean()
    assert diff.top1 == pytest.approx(float(agree))
    # The reference's perplexity comes out of the same pass, equal to scoring the reference alone.
    assert diff.reference_ppl == pytest.approx(evaluate(Bigram(table), tokens, seq_len=16).ppl, rel=1e-12)
    assert evaluate(Bigram(table), tokens, seq_len=16).reference_ppl is None


def test_bad_arguments() -> None:
    model = Bigram(torch.zeros(3, 3))
    with pytest.raises(ConfigError):
        evaluate(model, torch.tensor([1, 2]), seq_len=1)
    with pytest.raises(ConfigError, match="no prediction"):
        evaluate(model, torch.tensor([1]))


README = {
    None: (19.885, 15.044),
    4: (20.310, 15.318),
    3: (21.611, 16.405),
}


@pytest.mark.slow
@pytest.mark.parametrize("bits", [None, 4, 3], ids=["bf16", "rtn-w4", "rtn-w3"])
def test_reproduces_readme_perplexities(bits: int | None) -> None:
    """The demo model's README table: bf16 and RTN asym g128, within 0.1 %."""
    model = load_causal_lm(DEMO_MODEL)
    if bits is not None:
        with torch.no_grad():
            for module in model.model.layers.modules():
                if isinstance(module, torch.nn.Linear):
                    qw = quantize_rtn(module.weight, QuantScheme(bits=bits, group_size=128))
                    module.weight.copy_(qw.dequantize())
    for path, expected in zip(EVAL_FILES, README[bits], strict=True):
        tokens = tokenize_file(DEMO_MODEL, path)
        started = time.perf_counter()
        result = evaluate(model, tokens)
        print(f"{path.name} bits={bits} ppl={result.ppl:.4f} ({time.perf_counter() - started:.1f}s)")
        assert result.predictions == {"eval-prose.txt": 56_112, "eval-code.txt": 58_957}[path.name]
        assert result.ppl == pytest.approx(expected, rel=1e-3)
