"""The static-cache decoder computes what transformers' growing cache does, across sequences and capacities."""

from __future__ import annotations

import pytest
import torch
from bitsmith.decoding import MIN_CAPACITY, DynamicDecoder, StaticDecoder, capacity_for
from bitsmith.demo import DEMO_MODEL
from bitsmith.errors import ConfigError
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()


def greedy(decoder: DynamicDecoder | StaticDecoder, prompt: torch.Tensor, new: int) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        logits = decoder.begin(prompt, new)
        tokens, every = [int(logits.argmax())], [logits]
        for _ in range(new - 1):
            logits = decoder.step(torch.tensor([[tokens[-1]]]))
            tokens.append(int(logits.argmax()))
            every.append(logits)
    return tokens, torch.stack(every)


def test_capacity_is_a_power_of_two_from_the_minimum() -> None:
    assert capacity_for(1) == MIN_CAPACITY
    assert capacity_for(MIN_CAPACITY) == MIN_CAPACITY
    assert capacity_for(MIN_CAPACITY + 1) == 2 * MIN_CAPACITY
    assert capacity_for(3000) == 4096


def test_static_decoding_equals_the_dynamic_cache_across_sequences(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    static = StaticDecoder(model, torch.device("cpu"))
    # A short sequence, a shorter one on the same cache (reset, not rebuilt), then one past the capacity.
    for length, new in [(9, 24), (3, 10), (MIN_CAPACITY - 5, 12)]:
        prompt = torch.randint(0, vocab, (1, length), generator=gen)
        want_tokens, want_logits = greedy(DynamicDecoder(model), prompt, new)
        with torch.no_grad():  # the decoders ask for the last position's logits only: the same numbers
            torch.testing.assert_close(want_logits[0], model(prompt).logits[0, -1], rtol=1e-5, atol=1e-5)
        capacity = static.capacity
        got_tokens, got_logits = greedy(static, prompt, new)
        assert got_tokens == want_tokens
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
        assert static.capacity == capacity_for(length + new)
        assert static.capacity >= capacity
    assert static.capacity == 2 * MIN_CAPACITY


def test_static_decoder_refuses_to_step_before_begin_or_past_its_promise(model: torch.nn.Module) -> None:
    static = StaticDecoder(model, torch.device("cpu"))
    with pytest.raises(ConfigError, match="after begin"):
        static.step(torch.tensor([[1]]))
    with torch.no_grad():
        static.begin(torch.tensor([[1] * (MIN_CAPACITY - 2)]), 2)
        static.step(torch.tensor([[2]]))
        static.step(torch.tensor([[3]]))
        with pytest.raises(ConfigError, match=f"holds {MIN_CAPACITY} tokens"):
            static.step(torch.tensor([[4]]))
