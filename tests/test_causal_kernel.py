"""The causal-kernel probe: its split layout computes the single causal call exactly; its table and JSON."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.causal_kernel import HEAD_DIM, HEADS, KV_HEADS, format_rows, main, measure, split_causal_forward


@pytest.mark.parametrize("block", [8, 16, 40, 64])  # 16 does not divide 40; 64 is one block
def test_split_causal_attention_equals_one_causal_call(block):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, HEADS, 40, HEAD_DIM, generator=gen)
    k, v = (torch.randn(1, KV_HEADS, 40, HEAD_DIM, generator=gen) for _ in range(2))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    split, split_lse = split_causal_forward(q, k, v, block)
    assert split.shape == out.shape and split_lse.shape == lse.shape == (1, HEADS, 40)
    assert torch.allclose(split, out, atol=1e-5) and torch.allclose(split_lse, lse, atol=1e-5)
    # the first query sees only the first key: its output is that key's value (query head 0 reads KV head 0)
    assert torch.allclose(split[0, 0, 0], v[0, 0, 0], atol=1e-6)


def test_the_probe_reports_every_length_and_block(tmp_path, capsys):
    row = measure(32, [8, 16], repeats=1)
    assert [s["block"] for s in row["split"]] == [8, 16] and all(s["max_abs_diff"] < 1e-5 for s in row["split"])
    assert all(row[f"{kind}_{phase}_s"] > 0 for kind in ("causal", "full") for phase in ("forward", "backward"))
    assert format_rows([row]).splitlines()[2].startswith("| 32 | ")
    assert main(["--lengths", "16", "24", "--blocks", "8", "--repeats", "1", "--threads", "1",
                 "--output-dir", str(tmp_path)]) == 0
    written = json.loads(next(tmp_path.glob("causal_kernel_*.json")).read_text())
    assert [r["length"] for r in written["rows"]] == [16, 24] and written["threads"] == 1
    assert "wrote " in capsys.readouterr().out
