"""The LM head alone: TRL 1.16's fused log-prob head against unialign's chunked head, memory and time against N.

Both heads compute ``log softmax(h·Wᵀ)[target]`` for N scored positions without materializing the
``(N, vocab)`` logits. They differ in what they hold while doing it:

* TRL's DPO and KTO trainers patch the model with ``trl.trainer.utils.add_fused_lm_head``, whose
  ``ChunkedLogProbFunction`` projects tiles of up to 4096 tokens × 32768 vocabulary columns. Without
  Triton (on CPU) each tile is folded by whole-tile torch ops, which allocate tile-sized temporaries;
  the DPO trainer also asks for the entropy, the mean logit and whether the target is the top-1 token,
  for its metrics. On CPU it scores every position of the batch, the prompt's included.
* unialign's ``ChunkedTokenLogps`` projects ``logprob_chunk_size`` (1024) tokens × the whole vocabulary
  at a time, and only the positions whose token is scored.

This probe runs each head's forward and backward (the head's weight trained, as in a full fine-tune)
on the same random rows at SmolLM2-135M's head shape (576 × 49152, float32) and prints the C heap's
peak above the start (``benchmarks.bench.PeakMemory``), the best seconds with the share of a profiled
run spent outside the matmuls, the best seconds of a forward without gradients (a reference pass), and
the largest differences between the two heads' results:

    python -m benchmarks.lm_head --tokens 2046 4094 8190 --threads 2

(the positions TRL scores in the bench's DPO rows of 1024, 2048 and 4096 tokens: 2 × (length − 1)).
It writes ``benchmarks/results/lm_head_<time>.json``. ``--chunk-sizes 256 512 1024 2048`` also times unialign's
head at each ``logprob_chunk_size``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

from benchmarks import best_seconds
from benchmarks.bench import PeakMemory
from unialign.logprobs import ChunkedTokenLogps

HIDDEN, VOCAB = 576, 49152
TRL_DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")  # what TRL 1.16's DPOTrainer requests


def trl_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs through TRL's fused head, with the outputs and vocabulary tile its DPO trainer uses."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    return ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                        TRL_DPO_OUTPUTS)[0]


def unialign_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  chunk_size: int = 1024) -> torch.Tensor:
    """Per-token log-probs through unialign's chunked head at the trainer's default ``logprob_chunk_size``."""
    return ChunkedTokenLogps.apply(hidden, weight, None, targets, chunk_size)


HEADS = {"trl": trl_head, "unialign": unialign_head}


def step(head, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One forward and backward of ``head``; the log-probs, detached. Gradients are cleared first."""
    hidden.grad = weight.grad = None
    logps = head(hidden, weight, targets)
    logps.sum().backward()
    return logps.detach()


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_")


def matmul_share(fn) -> tuple[float, float]:
    """Self CPU seconds of one call of ``fn`` under torch.profiler: ``(all ops, matmul ops)``."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    return total, sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6


def measure(tokens: int, repeats: int, hidden_size: int = HIDDEN, vocab: int = VOCAB, seed: int = 0) -> dict:
    """Per head, over ``tokens`` positions: heap peak (MiB) and best seconds of one forward + backward, the
    profiled share of it outside the matmuls, and the best seconds of a forward without gradients (a
    reference pass); and the largest differences between the heads' log-probs and hidden-state gradients."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.05).requires_grad_()
    hidden = torch.randn(tokens, hidden_size, generator=gen).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    row: dict = {"tokens": tokens, "hidden": hidden_size, "vocab": vocab}
    results = {}
    for name, head in HEADS.items():
        step(head, hidden, weight, targets)  # untimed: first-call costs stay out of both readings
        memory = PeakMemory("cpu")
        with memory:
            logps = step(head, hidden, weight, targets)
        results[name] = logps, hidden.grad.clone()
        row[f"{name}_peak_mib"] = memory.delta_mb
        train = functools.partial(step, head, hidden, weight, targets)
        row[f"{name}_s"] = best_seconds(repeats, train)
        total, matmul = matmul_share(train)
        row[f"{name}_outside_matmul"] = 1 - matmul / total
        with torch.no_grad():
            row[f"{name}_no_grad_s"] = best_seconds(repeats, functools.partial(head, hidden, weight, targets))
    row["max_logp_diff"] = float((results["trl"][0] - results["unialign"][0]).abs().max())
    row["max_grad_diff"] = float((results["trl"][1] - results["unialign"][1]).abs().max())
    return row


def chunk_sweep(tokens: int, chunk_sizes: list[int], repeats: int, hidden_size: int = HIDDEN, vocab: int = VOCAB,
                seed: int = 0) -> list[dict]:
    """unialign's head at each ``logprob_chunk_size``: heap peak (MiB), best seconds of forward + backward and of
    a forward without gradients, and the largest log-prob difference from the first chunk size's."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.05).requires_grad_()
    hidden = torch.randn(tokens, hidden_size, generator=gen).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    rows, first = [], None
    for size in chunk_sizes:
        head = functools.partial(unialign_head, chunk_size=size)
        step(head, hidden, weight, targets)
        memory = PeakMemory("cpu")
        with memory:
            logps = step(head, hidden, weight, targets)
        first = logps if first is None else first
        with torch.no_grad():
            no_grad = best_seconds(repeats, functools.partial(head, hidden, weight, targets))
        rows.append({"tokens": tokens, "chunk_size": size, "peak_mib": memory.delta_mb,
                     "s": best_seconds(repeats, functools.partial(step, head, hidden, weight, targets)),
                     "no_grad_s": no_grad, "max_logp_diff": float((logps - first).abs().max())})
    return rows


def format_chunk_rows(rows: list[dict]) -> str:
    """One Markdown table: per N and chunk size, unialign's head peak and seconds."""
    lines = ["| tokens N | chunk size | peak MiB | forward + backward s | no-grad s | max log-prob diff |",
             "|" + "---|" * 6]
    lines += [f"| {r['tokens']} | {r['chunk_size']} | {r['peak_mib']:.0f} | {r['s']:.2f} | {r['no_grad_s']:.2f} | "
              f"{r['max_logp_diff']:.1e} |" for r in rows]
    return "\n".join(lines)


def format_rows(rows: list[dict]) -> str:
    """One Markdown table: per N, each head's heap peak and seconds, and how far apart their results are."""
    lines = ["| tokens N | TRL peak MiB | unialign peak MiB | TRL MiB per token | TRL s (outside matmul) "
             "| unialign s (outside matmul) | TRL no-grad s | unialign no-grad s | max log-prob diff "
             "| max grad diff |", "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['trl_peak_mib']:.0f} | {r['unialign_peak_mib']:.0f} | "
            f"{r['trl_peak_mib'] / r['tokens']:.3f} | {r['trl_s']:.2f} ({r['trl_outside_matmul']:.0%}) | "
            f"{r['unialign_s']:.2f} ({r['unialign_outside_matmul']:.0%}) | {r['trl_no_grad_s']:.2f} | "
            f"{r['unialign_no_grad_s']:.2f} | {r['max_logp_diff']:.1e} | {r['max_grad_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.lm_head``: measure, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2046, 4094, 8190], help="scored positions N")
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[],
                        help="also time unialign's head at these logprob_chunk_size values")
    parser.add_argument("--output-dir", default="benchmarks/results", help="'' for no JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(n, args.repeats, args.hidden, args.vocab) for n in args.tokens]
    print(format_rows(rows))
    chunks = [r for n in args.tokens for r in chunk_sweep(n, args.chunk_sizes, args.repeats, args.hidden, args.vocab)]
    if chunks:
        print(format_chunk_rows(chunks))
    if args.output_dir:
        path = Path(args.output_dir) / f"lm_head_{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        import trl

        record = {"threads": args.threads, "torch": torch.__version__, "trl": trl.__version__, "rows": rows,
                  "chunk_rows": chunks}
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
