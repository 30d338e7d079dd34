"""Layouts at length: step memory and time of the packed-row layouts on synthetic rows.

Two comparisons on the same model, the same token ids and one process:

* prefix sharing — one row ``prompt (P tokens) + K completions (C tokens each)``, scored with the
  dense ``(1, 1, W, W)`` block mask (``packed_attention: dense``) against segment attention
  (``packed_attention: segments``); optionally the plain layout (K padded sequences) too;
* padding — two DPO rows of unequal length (prompts P and P/2, completions C, 3C/4, C/2, 3C/8)
  as four right-padded sequences against one padding-free row (``padding_free``).

A step is the policy's forward and backward over the batch's log-probs (the part the layout
changes; no optimizer, no reference). Peak step memory is ``benchmarks.bench.PeakMemory`` (the C
heap's bytes in use above the value before the step, sampled by a thread and at every decoder
layer's forward and backward). The growth exponent ``b`` of memory ∝ width^b is a least-squares fit
in log-log space over the measured lengths. A first table, which runs no model, gives the bytes
of every tensor each prefix-sharing layout builds (``--bytes-lengths``, K = ``--bytes-completions``).

    flock /tmp/unialign-cpu.lock python -m benchmarks.layouts --lengths 512 1024 2048

prints a table and writes ``benchmarks/results/layouts_<time>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.bench import PeakMemory
from unialign.config import DEFAULT_MODEL, UnialignConfig
from unialign.data.collate import PreferenceCollator, pack_segments, pack_shared_prefix
from unialign.data.tokenize import TokenizedExample
from unialign.losses.registry import get_method
from unialign.models import load_model
from unialign.trainer import UnialignTrainer

RESULTS = Path(__file__).parent / "results"

# name → (prefix_sharing, packed_attention, padding_free)
LAYOUTS = {
    "plain": (False, "segments", False),
    "dense-mask": (True, "dense", False),
    "segments": (True, "segments", False),
    "padded": (False, "segments", False),
    "padding-free": (False, "segments", True),
}


def _ids(gen: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(5, vocab, (n,), generator=gen).tolist()


def shared_prompt_rows(prompt: int, completions: int, length: int, vocab: int) -> list[TokenizedExample]:
    """One row: a ``prompt``-token prompt and ``completions`` completions of ``length`` tokens."""
    gen = torch.Generator().manual_seed(prompt)
    return [TokenizedExample(_ids(gen, prompt, vocab), [_ids(gen, length, vocab) for _ in range(completions)], 0)]


def ragged_pair_rows(prompt: int, length: int, vocab: int) -> list[TokenizedExample]:
    """Two DPO rows of unequal length: prompts P and P/2, completions C, 3C/4 and C/2, 3C/8."""
    gen = torch.Generator().manual_seed(prompt + 1)
    sizes = [(prompt, (length, 3 * length // 4)), (prompt // 2, (length // 2, 3 * length // 8))]
    return [
        TokenizedExample(_ids(gen, p, vocab), [_ids(gen, c, vocab) for c in completions], row)
        for row, (p, completions) in enumerate(sizes)
    ]


def _trainer(model, layout: str, output_dir: str) -> UnialignTrainer:
    prefix_sharing, packed_attention, padding_free = LAYOUTS[layout]
    cfg = UnialignConfig(
        output_dir=output_dir,
        loss_type="dpo",
        prefix_sharing=prefix_sharing,
        packed_attention=packed_attention,
        padding_free=padding_free,
        report_to=[],
        use_cpu=True,
    )
    return UnialignTrainer(model=model, args=cfg, method=get_method("dpo"))


def fed_width(batch, layout: str) -> tuple[int, int]:
    """(rows, width) of the tensors the layout hands the model."""
    packed = batch.packed
    shape = (batch.input_ids if packed is None else packed.input_ids).shape
    return int(shape[0]), int(shape[1])


def measure(model, layout: str, examples: list, num_slots: int, steps: int, output_dir: str) -> dict:
    """Seconds per step and peak step memory of the policy's forward + backward under ``layout``."""
    trainer = _trainer(model, layout, output_dir)
    batch = PreferenceCollator(0, num_slots)(examples)
    times, peaks, total = [], [], None
    for _ in range(steps):
        fresh = dataclasses.replace(batch, packed=None)
        model.zero_grad(set_to_none=False)  # gradient buffers (allocated by the warm-up) stay in the baseline
        memory = PeakMemory("cpu")
        handles = memory.watch(model)
        start = time.perf_counter()
        with memory:
            out = trainer._logps(model, fresh)
            total = out.seq.sum()
            total.backward()
        times.append(time.perf_counter() - start)
        for handle in handles:
            handle.remove()
        peaks.append(memory.delta_mb)
    rows, width = fed_width(fresh, layout)
    real = int(batch.attention_mask.sum())
    return {
        "layout": layout,
        "rows_fed": rows,
        "width_fed": width,
        "tokens_fed": rows * width,
        "plain_tokens": real,
        "logp_sum": float(total.detach()),
        "s_per_step": min(times),
        "peak_step_mem_mb": max(peaks),
    }


def layout_bytes(prompt: int, completions: int, length: int) -> dict:
    """Bytes of every tensor each prefix-sharing layout builds for one row (no model run).

    The dense layout counts its ``allowed`` mask and the additive float32 mask the trainer makes of it;
    the segment layout its per-token tensors, which is all the CPU path builds, and with the additive
    float32 masks the SDPA path (a GPU, attention dropout) makes of its plan.
    """
    batch = PreferenceCollator(0, completions)(shared_prompt_rows(prompt, completions, length, 50_000))

    def size(tensor):
        return tensor.numel() * tensor.element_size()

    dense = pack_shared_prefix(batch)
    fields = [getattr(dense, f.name) for f in dataclasses.fields(dense)]
    dense_bytes = sum(size(t) for t in fields if isinstance(t, torch.Tensor)) + dense.allowed.numel() * 4
    segments = pack_segments(batch, prefix_sharing=True, padding_free=False)
    fields = [getattr(segments, f.name) for f in dataclasses.fields(segments)]
    segment_bytes = sum(size(t) for t in fields if isinstance(t, torch.Tensor))
    return {"prompt": prompt, "K": completions, "width": int(dense.input_ids.shape[1]),
            "dense_mask_layout_bytes": dense_bytes, "segment_layout_bytes": segment_bytes,
            "segment_sdpa_layout_bytes": segment_bytes + 4 * segments.plan.mask_elements()}


def growth_exponent(widths: list[float], values: list[float]) -> float | None:
    """Least-squares slope of log(value) against log(width); ``None`` with fewer than two points."""
    if len(widths) < 2:
        return None
    xs, ys = [math.log(w) for w in widths], [math.log(max(v, 1e-9)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 1024, 2048],
                        help="prompt tokens (none, with no --padding-lengths either: the bytes table only)")
    parser.add_argument("--padding-lengths", type=int, nargs="*", default=[512, 1024], help="prompt tokens")
    parser.add_argument("--completions", type=int, default=4, help="K, completions per prompt")
    parser.add_argument("--completion-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bytes-lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192],
                        help="prompt tokens for the layout-bytes table (K = --bytes-completions)")
    parser.add_argument("--bytes-completions", type=int, default=8)
    parser.add_argument("--with-plain", action="store_true", help="also the plain layout (K padded sequences)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [layout_bytes(p, args.bytes_completions, args.completion_length) for p in args.bytes_lengths]
    print("| prompt | K | row width | dense-mask layout MiB | segment layout MiB, CPU | segment layout MiB, SDPA |")
    print("|---|---|---|---|---|---|")
    for r in sizes:
        print(f"| {r['prompt']} | {r['K']} | {r['width']} | {r['dense_mask_layout_bytes'] / 2**20:.1f} "
              f"| {r['segment_layout_bytes'] / 2**20:.2f} | {r['segment_sdpa_layout_bytes'] / 2**20:.2f} |")
    size_exponents = {
        name: round(growth_exponent([r["width"] for r in sizes], [r[name] for r in sizes]), 3)
        for name in ("dense_mask_layout_bytes", "segment_layout_bytes", "segment_sdpa_layout_bytes")
    } if len(sizes) > 1 else {}
    print(f"layout bytes growth exponents vs row width: {size_exponents}", flush=True)
    rows, exponents = (_measure_layouts(args) if args.lengths or args.padding_lengths else ([], {}))
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"layouts_{time.strftime('%Y%m%d-%H%M%S')}.json"
    result = {"args": vars(args), "rows": rows, "memory_growth_exponents": exponents, "layout_bytes": sizes,
              "layout_bytes_growth_exponents": size_exponents}
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


def _measure_layouts(args) -> tuple[list[dict], dict]:
    """Step time and memory of each layout on the model (the rows and their memory growth exponents)."""
    torch.manual_seed(0)
    model = load_model(args.model, attn_implementation="sdpa")
    model.train()
    vocab = model.config.vocab_size
    output_dir = "/tmp/unialign-layouts"
    warm = shared_prompt_rows(64, 2, 16, vocab)
    for layout in ("dense-mask", "segments"):  # first-call overheads out of the measured steps
        measure(model, layout, warm, 2, 1, output_dir)
    rows = []
    prefix_layouts = (["plain"] if args.with_plain else []) + ["dense-mask", "segments"]
    for prompt in args.lengths:
        examples = shared_prompt_rows(prompt, args.completions, args.completion_length, vocab)
        for layout in prefix_layouts:
            row = measure(model, layout, examples, args.completions, args.steps, output_dir)
            rows.append({"comparison": "prefix sharing", "prompt": prompt, "K": args.completions} | row)
            print(json.dumps(rows[-1]), flush=True)
    for prompt in args.padding_lengths:
        examples = ragged_pair_rows(prompt, args.completion_length, vocab)
        for layout in ("padded", "padding-free"):
            row = measure(model, layout, examples, 2, args.steps, output_dir)
            rows.append({"comparison": "padding", "prompt": prompt, "K": 2} | row)
            print(json.dumps(rows[-1]), flush=True)
    exponents = {}
    for comparison in ("prefix sharing", "padding"):
        for layout in LAYOUTS:
            mine = [r for r in rows if r["comparison"] == comparison and r["layout"] == layout]
            exponent = growth_exponent([r["tokens_fed"] for r in mine], [r["peak_step_mem_mb"] for r in mine])
            if exponent is not None:
                exponents[f"{comparison}/{layout}"] = round(exponent, 3)
    print()
    print("| comparison | prompt | K | layout | rows × width fed | s/step | peak step MiB | Σ log-p |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['comparison']} | {r['prompt']} | {r['K']} | {r['layout']} | {r['rows_fed']} × {r['width_fed']} "
            f"| {r['s_per_step']:.2f} | {r['peak_step_mem_mb']:.0f} | {r['logp_sum']:.2f} |"
        )
    print()
    for name, exponent in exponents.items():
        print(f"memory growth exponent {name}: {exponent}")
    return rows, exponents


if __name__ == "__main__":
    raise SystemExit(main())
