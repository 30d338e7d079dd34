"""Log-probs (SPEC §1): the chunked path equals a direct per-sequence computation, values and gradients."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from unialign.logprobs import ChunkedTokenLogps, chunked_head_is_exact, sequence_logps, token_logps


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (3, 12))
    attention = torch.ones_like(ids)
    attention[2, 9:] = 0  # right padding
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[0, 4:12] = True
    target[1, 7:12] = True
    target[2, 3:9] = True
    return ids, attention, target


def _direct(model, ids, attention, target):
    """One sequence at a time, full logits, no padding: the plain definition."""
    sums = []
    for i in range(ids.shape[0]):
        n = int(attention[i].sum())
        logits = model(input_ids=ids[i : i + 1, :n]).logits[0].float()
        logp = logits[:-1].log_softmax(-1).gather(1, ids[i, 1:n, None]).squeeze(1)
        sums.append((logp * target[i, 1:n]).sum())
    return torch.stack(sums)


@pytest.mark.parametrize("impl", ["chunked", "full"])
def test_sequence_logps_equal_direct_computation(model, impl):
    ids, attention, target = _batch()
    with torch.no_grad():
        values = token_logps(model, ids, attention, target, impl=impl, chunk_size=5)
        summed, lengths = sequence_logps(values, target)
        expected = _direct(model, ids, attention, target)
    torch.testing.assert_close(summed, expected, atol=1e-5, rtol=1e-5)
    assert lengths.tolist() == [8, 5, 6]
    assert (values[~target] == 0).all()


def test_chunked_gradients_equal_plain_autograd():
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (7,))
    upstream = torch.randn(7, dtype=torch.float64)
    out = ChunkedTokenLogps.apply(hidden, weight, bias, targets, 3)
    (out * upstream).sum().backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    plain = (hidden @ weight.t() + bias).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (plain * upstream).sum().backward()
    torch.testing.assert_close(out.double(), plain, atol=1e-5, rtol=1e-5)
    for got, t in zip(grads, (hidden, weight, bias)):
        torch.testing.assert_close(got, t.grad, atol=1e-5, rtol=1e-5)


def test_tiny_llama_head_is_exact(model):
    assert chunked_head_is_exact(model)


@pytest.mark.parametrize("impl", ["chunked", "full"])
def test_explicit_positions_and_sources_equal_the_defaults(model, impl):
    """``position_ids`` 0..L-1 and ``source_index`` = previous column are what token_logps assumes by default."""
    ids, attention, target = _batch()
    positions = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)
    sources = (positions - 1).clamp(min=0)
    with torch.no_grad():
        plain = token_logps(model, ids, attention, target, impl=impl)
        explicit = token_logps(model, ids, attention, target, impl=impl, position_ids=positions, source_index=sources)
        shifted = token_logps(model, ids, attention, target, impl=impl, source_index=sources.clamp(max=2))
    torch.testing.assert_close(explicit, plain, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(shifted, plain)  # the source column really is read


@pytest.mark.parametrize("with_bias", [False, True])
def test_frozen_head_gradients_equal_plain_autograd(with_bias):
    """LoRA's case: only the hidden states need a gradient, and forward precomputes their Jacobian."""
    torch.manual_seed(1)
    hidden = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    bias = torch.randn(50, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, 50, (7,))
    upstream = torch.randn(7, dtype=torch.float64)
    out = ChunkedTokenLogps.apply(hidden, weight, bias, targets, 3)
    (out * upstream).sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    logits = hidden @ weight.t() + (bias if with_bias else 0)
    plain = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (plain * upstream).sum().backward()
    torch.testing.assert_close(out.double(), plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, hidden.grad, atol=1e-5, rtol=1e-5)
    assert got.dtype == hidden.dtype
