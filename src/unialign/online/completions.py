"""The completions table of online runs: prompt, completion, each reward and the advantage (or target).

With ``log_completions: true`` every ``log_completions_steps`` optimizer steps (default ``logging_steps``)
the rollout's first ``num_completions_to_print`` completions (default all) are appended to
``<output_dir>/completions.jsonl``, one JSON object per completion, and, when ``report_to`` names wandb
and a wandb run is active, logged as a ``completions`` table (TRL's ``log_completions`` layout).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from unialign import jsonfile
from unialign.rewards.base import prompt_text
from unialign.rundir import COMPLETIONS_FILE

logger = logging.getLogger(__name__)


def completion_rows(step: int, prompts: list, completions: list[str], rewards: list[float],
                    per_source: dict[str, list[float]], signal_name: str, signal: list[float],
                    limit: int | None = None) -> list[dict[str, Any]]:
    """One row per completion: ``step``, ``prompt`` (its text), ``completion``, ``reward``, ``reward/<source>``,
    and the method's per-completion signal (``advantage`` or ``target``); the first ``limit`` rows only."""
    count = len(completions) if limit is None else min(limit, len(completions))
    rows = []
    for i in range(count):
        row = {"step": step, "prompt": prompt_text(prompts[i]), "completion": completions[i], "reward": rewards[i]}
        row |= {f"reward/{name}": values[i] for name, values in per_source.items()}
        row[signal_name] = signal[i]
        rows.append(row)
    return rows


class CompletionsLog:
    """Appends completion rows to ``completions.jsonl`` in the run folder, and to wandb when it is in use."""

    def __init__(self, output_dir: str | Path, report_to: list[str] | None):
        self.path = Path(output_dir) / COMPLETIONS_FILE
        self.wandb = "wandb" in (report_to or [])

    def start(self, step: int) -> None:
        """At training start: a fresh run begins an empty table; a resumed one drops rows after its step."""
        if not self.path.exists():
            return
        if step == 0:
            self.path.unlink()
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and jsonfile_step(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` (and log them as a wandb table when wandb is configured and running)."""
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(jsonfile.dumps(row) + "\n")
        if self.wandb:
            self._to_wandb(rows)

    @staticmethod
    def _to_wandb(rows: list[dict[str, Any]]) -> None:
        try:
            import wandb  # optional: the table goes to wandb only where it is installed
        except ImportError:
            return
        if wandb.run is None:
            return
        columns = list(rows[0])
        wandb.log({"completions": wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])})


def jsonfile_step(line: str) -> int:
    """The ``step`` of one completions.jsonl line (a line without one counts as step 0)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0
