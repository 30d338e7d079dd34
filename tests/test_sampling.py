"""Length-aware samplers (``train_sampling_strategy``) on tokenized preference rows."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler

from unialign.config import UnialignConfig
from unialign.data.collate import PreferenceCollator
from unialign.data.tokenize import TokenizedExample
from unialign.losses.registry import get_method
from unialign.trainer import UnialignTrainer, example_length


def _pair(prompt: int, chosen: int, rejected: int, row: int = 0) -> TokenizedExample:
    return TokenizedExample([1] * prompt, [[2] * chosen, [3] * rejected], row)


def test_example_length_is_the_row_a_batch_pads_to():
    pair = _pair(10, 5, 7)
    assert example_length(pair, packed=False) == 17  # the longest sequence: prompt + longer completion
    assert example_length(pair, packed=True) == 22  # one packed row: the prompt once, both completions
    binary = TokenizedExample([1] * 4, [[2] * 3], 0, kl_completion_ids=[5] * 6)
    assert example_length(binary, packed=False) == 10
    assert example_length(binary, packed=True) == 13
    single = TokenizedExample([1] * 4, [[2] * 3], 0)
    assert example_length(single, packed=True) == 7  # nothing to pack


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _trainer(model, tmp_path, examples, strategy: str) -> UnialignTrainer:
    cfg = UnialignConfig(output_dir=str(tmp_path), loss_type="dpo", train_sampling_strategy=strategy,
                         per_device_train_batch_size=2, report_to=[], use_cpu=True, seed=3)
    return UnialignTrainer(model=model, args=cfg, method=get_method("dpo"), train_dataset=examples,
                           data_collator=PreferenceCollator(0, 2))


# Short and long rows interleaved: random batches mix them, grouped batches should not.
EXAMPLES = [_pair(4 + 40 * (i % 2), 3 + i % 3, 2 + i % 4, row=i) for i in range(96)]


def _mixed_batches(batches) -> int:
    return sum(len({int(r) % 2 for r in batch.row_index}) > 1 for batch in batches)


def test_group_by_length_batches_rows_of_similar_length(model, tmp_path):
    trainer = _trainer(model, tmp_path, EXAMPLES, "group_by_length")
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    batches = list(trainer.get_train_dataloader())
    assert sorted(int(r) for b in batches for r in b.row_index) == list(range(96))  # every row once
    # transformers sorts "megabatches" of 12 batches by length here (96 rows // (4 × batch 2)), so a short and a
    # long row can only meet at a megabatch's middle: at most 4 mixed batches of 48, where random order mixes ~24
    assert _mixed_batches(batches) <= 4
    assert _mixed_batches(_trainer(model, tmp_path, EXAMPLES, "random").get_train_dataloader()) > 12


def test_random_sampling_is_still_the_default(model, tmp_path):
    trainer = _trainer(model, tmp_path, EXAMPLES, "random")
    assert isinstance(trainer._get_train_sampler(), torch.utils.data.RandomSampler)


def test_batch_rebalance_gets_the_rows_lengths(model, tmp_path):
    trainer = _trainer(model, tmp_path, EXAMPLES, "batch_rebalance")
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, BatchRebalanceSampler)
    batches = list(trainer.get_train_dataloader())
    assert sorted(int(r) for b in batches for r in b.row_index) == list(range(96))
