"""How much a causal call of PyTorch's CPU flash-attention kernel saves, and whether splitting it helps.

Segment attention (``src/unialign/attention.py``) runs every prompt and every completion's own keys as
one ``is_causal`` call of ``aten._scaled_dot_product_flash_attention_for_cpu``. Ideally a causal call
costs half a full one; the kernel skips the upper triangle only in whole key blocks, so it costs more.
This probe times, at SmolLM2-135M's attention shapes (9 query heads, 3 key/value heads, 64 dims,
float32):

* the causal and the full call, forward and the kernel's own backward op;
* the alternative of splitting the causal call into query blocks of ``B`` rows — each block attends
  the earlier keys with a full call and its own ``B`` keys with a causal one, merged by their
  log-sum-exps (:func:`unialign.attention.merge_by_lse`, which segment attention itself uses after a
  shared prompt).

    python -m benchmarks.causal_kernel --lengths 1024 2048 --threads 2

prints a table and writes ``benchmarks/results/causal_kernel_<time>.json``. Best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import best_seconds
from unialign.attention import merge_by_lse

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def split_causal_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int):
    """Causal attention of ``q`` over ``k``/``v`` (same length) as query blocks of ``block`` rows: each a full
    call over the keys before it and a causal call over its own, merged by log-sum-exp. Returns
    ``(output (B, H, T, D), log-sum-exp (B, H, T))`` as the single causal call does."""
    outs, lses = [], []
    for start in range(0, q.shape[2], block):
        stop = start + block
        own = _FORWARD(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], 0.0, True)
        if start:
            own = merge_by_lse(_FORWARD(q[:, :, start:stop], k[:, :, :start], v[:, :, :start], 0.0, False), own)
        outs.append(own[0])
        lses.append(own[1])
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def measure(length: int, blocks: list[int], repeats: int, seed: int = 0) -> dict:
    """Forward and backward seconds of the causal and the full call at ``length``, and the split forwards'
    seconds with their largest deviation from the single causal call."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HEADS, length, HEAD_DIM, generator=gen)
    k, v = (torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen) for _ in range(2))
    row: dict = {"length": length}
    outputs = {}
    for causal in (True, False):
        out, lse = outputs[causal] = _FORWARD(q, k, v, 0.0, causal)
        grad = torch.randn(out.shape, generator=gen)
        name = "causal" if causal else "full"
        row[f"{name}_forward_s"] = best_seconds(repeats, _FORWARD, q, k, v, 0.0, causal)
        row[f"{name}_backward_s"] = best_seconds(repeats, _BACKWARD, grad, q, k, v, out, lse, 0.0, causal)
    reference = outputs[True][0]
    row["split"] = []
    for block in blocks:
        split, _ = split_causal_forward(q, k, v, block)
        row["split"].append({"block": block, "forward_s": best_seconds(repeats, split_causal_forward, q, k, v, block),
                             "max_abs_diff": float((split - reference).abs().max())})
    return row


def format_rows(rows: list[dict]) -> str:
    """One Markdown table: per length, causal vs full (forward, backward) and each split's forward."""
    lines = ["| length | causal fwd ms | full fwd ms | causal / full fwd | causal bwd ms | full bwd ms "
             "| causal / full bwd | split forwards (block: ms, × causal, max diff) |", "|" + "---|" * 8]
    for r in rows:
        splits = "; ".join(f"{s['block']}: {s['forward_s'] * 1e3:.1f}, {s['forward_s'] / r['causal_forward_s']:.2f}×, "
                           f"{s['max_abs_diff']:.1e}" for s in r["split"])
        lines.append(
            f"| {r['length']} | {r['causal_forward_s'] * 1e3:.1f} | {r['full_forward_s'] * 1e3:.1f} | "
            f"{r['causal_forward_s'] / r['full_forward_s']:.2f} | {r['causal_backward_s'] * 1e3:.1f} | "
            f"{r['full_backward_s'] * 1e3:.1f} | {r['causal_backward_s'] / r['full_backward_s']:.2f} | {splits} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.causal_kernel``: measure, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512], help="query rows per split block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output-dir", default="benchmarks/results", help="'' for no JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(n, args.blocks, args.repeats) for n in args.lengths]
    print(format_rows(rows))
    if args.output_dir:
        path = Path(args.output_dir) / f"causal_kernel_{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"threads": args.threads, "torch": torch.__version__, "rows": rows}
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
