"""Padding in the batches unialign feeds the model: random order against ``train_sampling_strategy: group_by_length``.

Counts, over one epoch of each method's bundled data, the positions of the tensors the policy's
forward is fed (the packed layout where a batch is packed, the plain one otherwise) and how many of
them are padding. No model runs; it takes seconds.

    python -m benchmarks.padding [--batch-size 4] [--max-length 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from benchmarks.bench import METHODS
from unialign.config import UnialignConfig
from unialign.data.collate import PreferenceCollator, has_shared_prompts, pack_shared_prefix, split_kl_rows
from unialign.losses.registry import get_method
from unialign.models import load_tokenizer
from unialign.pipeline import prepare_data
from unialign.trainer import example_length


def fed_positions(examples: list, order: list[int], batch_size: int, collator: PreferenceCollator) -> tuple[int, int]:
    """(positions fed to the policy's training passes, of which padding) over the batches of ``order``.

    The layouts are the trainer's: KTO's KL sequences get a plain pass of their own, as do its scored
    completions; otherwise a batch with a row of two or more completions is packed, one row per example.
    """
    fed = real = 0
    for start in range(0, len(order), batch_size):
        rows = [examples[i] for i in order[start : start + batch_size]]
        batch = collator(rows)
        if batch.kl_seq is None and has_shared_prompts(batch):
            packed = pack_shared_prefix(batch)
            fed += packed.input_ids.numel()
            real += sum(len(e.prompt_ids) + sum(map(len, e.completion_ids)) for e in rows)
            continue
        for plain in split_kl_rows(batch) if batch.kl_seq is not None else [batch]:
            fed += plain.input_ids.numel()
            real += int(plain.attention_mask.sum())
    return fed, fed - real


def main() -> None:
    """Print the padding share of each bundled method under both orders."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    print(f"batch {args.batch_size}, max_length {args.max_length}, prefix sharing on, one epoch of each bundled set")
    print("| method | rows | padding, random order | padding, group_by_length | positions fed, grouped / random |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        spec = get_method(method)
        cfg = UnialignConfig(loss_type=method, output_dir=tempfile.mkdtemp(), max_length=args.max_length, report_to=[])
        examples = prepare_data(METHODS[method]["data"], cfg, spec, tokenizer).examples
        collator = PreferenceCollator(tokenizer.pad_token_id, max(len(e.completion_ids) for e in examples),
                                      with_prompt_logps=spec.needs_prompt_logps, with_kl_pairs=spec.needs_kl_pairs)
        generator = torch.Generator().manual_seed(args.seed)
        random_order = torch.randperm(len(examples), generator=generator).tolist()
        lengths = [example_length(e, packed=True) for e in examples]
        torch.manual_seed(args.seed)
        grouped_order = list(LengthGroupedSampler(args.batch_size, lengths=lengths))
        fed_r, pad_r = fed_positions(examples, random_order, args.batch_size, collator)
        fed_g, pad_g = fed_positions(examples, grouped_order, args.batch_size, collator)
        print(f"| {method} | {len(examples)} | {pad_r / fed_r:.1%} | {pad_g / fed_g:.1%} | {fed_g / fed_r:.3f} |")


if __name__ == "__main__":
    main()
