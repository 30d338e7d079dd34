"""Sampling records each token's entropy from the logits generate computes, as a full forward would give it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from unialign.generation import GenerationConfig, completion_ids, generate_from_ids


# At temperature 0.05 the random model's entropy varies from token to token (4.8 to 8.0 nats measured), so a record
# shifted by one position fails; at 1.0 it is near log(49152) = 10.80 everywhere.
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.05, 1.0), (0.05, 0.9)])
def test_recorded_entropy_equals_a_full_forward_over_the_samples(tiny_model_dir, temperature, top_p):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[5, 17, 300], [42, 7, 9, 11, 1000, 23]]  # different lengths: the shorter one is left-padded
    config = GenerationConfig(max_new_tokens=6, temperature=temperature, top_p=top_p, num_return_sequences=2,
                              batch_size=2, seed=3, repetition_penalty=1.0, record_entropy=True)
    groups = generate_from_ids(model, tokenizer, prompts, config)

    for prompt, group in zip(prompts, groups):
        for generation in group:
            sampled = completion_ids(generation)
            assert len(generation.entropy) == len(sampled)
            ids = torch.tensor([prompt + sampled])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1 : -1] / temperature
            # The entropy of softmax(logits / temperature), before top_p cuts the tail (the token-level methods'
            # definition): not of the truncated distribution.
            logp = torch.log_softmax(logits, -1)
            expected = -(logp.exp() * logp).sum(-1)
            torch.testing.assert_close(torch.tensor(generation.entropy), expected, atol=1e-4, rtol=1e-5)
    if temperature == 1.0:  # a random model over 49k tokens is close to uniform: log(49152) = 10.80
        assert 10.7 < groups[0][0].entropy[0] < 10.81
    else:
        assert max(max(g.entropy) - min(g.entropy) for group in groups for g in group) > 1.0


def test_entropy_is_recorded_only_when_asked(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = GenerationConfig(max_new_tokens=3, temperature=1.0, num_return_sequences=1, seed=0)
    greedy = GenerationConfig(max_new_tokens=3, temperature=0, seed=0, record_entropy=True)
    assert generate_from_ids(model, tokenizer, [[5, 6]], plain)[0][0].entropy is None
    assert generate_from_ids(model, tokenizer, [[5, 6]], greedy)[0][0].entropy is None  # greedy: no distribution
