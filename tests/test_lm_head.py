"""The LM-head probe compares equal work: both heads give a plain log-softmax's values and gradients."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.lm_head import HEADS, chunk_sweep, format_chunk_rows, format_rows, main, measure, step


@pytest.mark.parametrize("tokens", [7, 4100])  # 4100 spans two of TRL's 4096-token tiles
@pytest.mark.parametrize("name", sorted(HEADS))
def test_each_head_gives_the_plain_log_softmax_and_its_gradients(name, tokens):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(70, 8, generator=gen).requires_grad_()
    hidden = torch.randn(tokens, 8, generator=gen).requires_grad_()
    targets = torch.randint(0, 70, (tokens,), generator=gen)
    logps = step(HEADS[name], hidden, weight, targets)
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = (hidden @ weight.t()).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    expected.sum().backward()
    assert logps.shape == (tokens,)
    assert torch.allclose(logps, expected.detach(), atol=1e-5)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-5) and torch.allclose(grads[1], weight.grad, atol=1e-4)


def test_the_probe_reports_both_heads_per_token_count(tmp_path, capsys):
    row = measure(33, repeats=1, hidden_size=8, vocab=50)
    assert row["tokens"] == 33 and row["max_logp_diff"] < 1e-5 and row["max_grad_diff"] < 1e-5
    assert all(row[f"{name}_{kind}"] > 0 for name in HEADS for kind in ("s", "no_grad_s", "outside_matmul"))
    assert all(row[f"{name}_outside_matmul"] < 1 for name in HEADS)
    assert format_rows([row]).splitlines()[2].startswith("| 33 | ")
    assert main(["--tokens", "5", "9", "--hidden", "8", "--vocab", "50", "--repeats", "1", "--threads", "1",
                 "--chunk-sizes", "2", "16", "--output-dir", str(tmp_path)]) == 0
    written = json.loads(next(tmp_path.glob("lm_head_*.json")).read_text())
    assert [r["tokens"] for r in written["rows"]] == [5, 9] and written["trl"]
    assert [(r["tokens"], r["chunk_size"]) for r in written["chunk_rows"]] == [(5, 2), (5, 16), (9, 2), (9, 16)]
    assert "wrote " in capsys.readouterr().out


def test_the_chunk_sweep_computes_the_same_log_probs_at_every_chunk_size():
    rows = chunk_sweep(37, [1, 5, 64], repeats=1, hidden_size=8, vocab=50)
    assert [r["chunk_size"] for r in rows] == [1, 5, 64] and rows[0]["max_logp_diff"] == 0.0
    assert all(r["max_logp_diff"] < 1e-5 and r["s"] > 0 and r["no_grad_s"] > 0 for r in rows)
    assert format_chunk_rows(rows).splitlines()[3].startswith("| 37 | 5 | ")
