"""Evaluation of a trained policy against its reference (docs/methods.md, evaluation).

On held-out prompts both models generate; a reward source scores both generations, giving mean
rewards and a per-prompt win/tie/loss rate. The policy's generations are also scored by both
models to estimate KL(π_θ‖π_ref). On held-out preference pairs the implicit reward
β·(log π_θ − log π_ref) gives an accuracy and a mean margin.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from unialign import jsonfile
from unialign.data.bundled import EVAL_PROMPTS
from unialign.data.collate import pad_sequences
from unialign.data.errors import DataError
from unialign.data.formats import ENDED_SUFFIX, validate_row
from unialign.data.sources import read_rows
from unialign.data.tokenize import encode_completions, encode_prompt
from unialign.generation import Generation, GenerationConfig, check_distinct_samples, completion_ids, generate
from unialign.logprobs import chunked_head_is_exact, sequence_logps, token_logps
from unialign.rewards import offline_judge as oj
from unialign.rewards.base import RewardSource, prompt_text

logger = logging.getLogger(__name__)

DEFAULT_BETA = 0.1


# ----------------------------------------------------------------------------- report types
@dataclass
class SideStats:
    """Statistics of one model's generations: explicit reward, length in tokens, EOS fraction."""

    mean_reward: float
    std_reward: float
    mean_length: float
    eos_fraction: float


@dataclass
class WinTieLoss:
    """Per-prompt outcome counts of policy vs reference under the reward."""

    wins: int
    ties: int
    losses: int

    @property
    def total(self) -> int:
        """Number of compared prompts."""
        return self.wins + self.ties + self.losses

    def rates(self) -> dict[str, float]:
        """Win, tie and loss fractions (NaN when nothing was compared)."""
        n = self.total
        return {
            "win_rate": self.wins / n if n else math.nan,
            "tie_rate": self.ties / n if n else math.nan,
            "loss_rate": self.losses / n if n else math.nan,
        }


@dataclass
class PairStats:
    """Implicit-reward accuracy and mean margin β·(logratio_chosen − logratio_rejected) on pairs."""

    num_pairs: int
    accuracy: float
    mean_margin: float


@dataclass
class EvalReport:
    """Everything :func:`evaluate` measures, plus per-prompt samples for inspection."""

    num_prompts: int
    reward_name: str
    policy: SideStats
    reference: SideStats
    outcomes: WinTieLoss
    kl: float
    beta: float
    pairs: PairStats | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    samples_per_prompt: int = 1
    mean_difference: float = 0.0
    difference_stderr: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; per-prompt records are under ``samples``."""
        return {
            "num_prompts": self.num_prompts,
            "samples_per_prompt": self.samples_per_prompt,
            "reward": self.reward_name,
            "mean_difference": self.mean_difference,
            "difference_stderr": self.difference_stderr,
            "policy": asdict(self.policy),
            "reference": asdict(self.reference),
            **self.outcomes.rates(),
            "wins": self.outcomes.wins,
            "ties": self.outcomes.ties,
            "losses": self.outcomes.losses,
            "kl": self.kl,
            "beta": self.beta,
            "pairs": asdict(self.pairs) if self.pairs is not None else None,
            "settings": dict(self.settings),
            "samples": list(self.samples),
        }

    def to_markdown(self, max_samples: int = 5) -> str:
        """A short human-readable summary table, then the first ``max_samples`` samples."""
        rates = self.outcomes.rates()
        p, r = self.policy, self.reference
        lines = [
            f"# Evaluation ({self.num_prompts} prompts × {self.samples_per_prompt} samples, "
            f"reward: {self.reward_name})",
            "",
            "| | policy | reference |",
            "|---|---|---|",
            f"| mean reward | {p.mean_reward:.4f} | {r.mean_reward:.4f} |",
            f"| std reward | {p.std_reward:.4f} | {r.std_reward:.4f} |",
            f"| mean length (tokens) | {p.mean_length:.2f} | {r.mean_length:.2f} |",
            f"| ended with EOS | {p.eos_fraction:.4f} | {r.eos_fraction:.4f} |",
            "",
            f"- win / tie / loss rate: {rates['win_rate']:.4f} / {rates['tie_rate']:.4f} / {rates['loss_rate']:.4f}"
            f" ({self.outcomes.wins} / {self.outcomes.ties} / {self.outcomes.losses})",
            f"- reward difference (policy − reference): {self.mean_difference:+.4f} ± {self.difference_stderr:.4f}"
            f" (standard error over {self.outcomes.total} paired samples)",
            f"- KL(policy ‖ reference) estimate: {self.kl:.4f} nats per completion",
        ]
        if self.pairs is not None:
            lines.append(
                f"- implicit-reward accuracy on {self.pairs.num_pairs} pairs: {self.pairs.accuracy:.4f}"
                f" (mean margin {self.pairs.mean_margin:.4f}, β = {self.beta:g})"
            )
        if self.settings:
            lines.append("- settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        for i, sample in enumerate(self.samples[:max_samples]):
            if i == 0:
                lines += ["", "## Samples"]
            lines += [
                "",
                f"**prompt:** {_one_line(sample['prompt'])}",
                f"- policy ({sample['policy_reward']:.4f}): {_one_line(sample['policy'])}",
                f"- reference ({sample['reference_reward']:.4f}): {_one_line(sample['reference'])}",
            ]
        return "\n".join(lines) + "\n"


def _one_line(value: Any) -> str:
    if isinstance(value, list):  # a conversation: show its messages
        value = " | ".join(f"{m.get('role')}: {m.get('content')}" for m in value)
    return str(value).replace("\n", " ⏎ ")


# ----------------------------------------------------------------------------- aggregation
def compare(policy_rewards: list[float], reference_rewards: list[float], tie_tolerance: float = 1e-6) -> WinTieLoss:
    """Count prompts where the policy's reward beats, ties (``|diff| <= tie_tolerance``) or loses to the reference's."""
    if len(policy_rewards) != len(reference_rewards):
        raise ValueError(f"{len(policy_rewards)} policy rewards but {len(reference_rewards)} reference rewards")
    wins = ties = losses = 0
    for mine, theirs in zip(policy_rewards, reference_rewards):
        diff = mine - theirs
        if abs(diff) <= tie_tolerance:
            ties += 1
        elif diff > 0:
            wins += 1
        else:
            losses += 1
    return WinTieLoss(wins, ties, losses)


def paired_difference(policy_rewards: list[float], reference_rewards: list[float]) -> tuple[float, float]:
    """Mean of ``policy − reference`` over paired samples and its standard error (0 with fewer than 2)."""
    diffs = [p - r for p, r in zip(policy_rewards, reference_rewards)]
    if not diffs:
        return 0.0, 0.0
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, 0.0
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(variance / len(diffs))


def side_stats(rewards: list[float], generations: list[Generation]) -> SideStats:
    """Mean/std (population) of rewards, mean completion length and EOS fraction of one model's generations."""
    n = len(rewards)
    if not n:
        return SideStats(math.nan, math.nan, math.nan, math.nan)
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    lengths = [completion_length(g) for g in generations]
    return SideStats(mean, std, sum(lengths) / n, sum(g.ended for g in generations) / n)


def completion_length(generation: Generation) -> int:
    """Tokens the model produced, counting the EOS token when it stopped on one."""
    return len(generation.token_ids) + int(generation.ended)


def pair_stats(chosen_logratios: list[float], rejected_logratios: list[float], beta: float) -> PairStats | None:
    """Accuracy (strictly higher implicit reward for the chosen completion) and mean margin."""
    if not chosen_logratios:
        return None
    margins = [beta * w - beta * lose for w, lose in zip(chosen_logratios, rejected_logratios)]
    accuracy = sum(beta * w > beta * lose for w, lose in zip(chosen_logratios, rejected_logratios)) / len(margins)
    return PairStats(len(margins), accuracy, sum(margins) / len(margins))


def per_prompt_outcomes(policy_rewards: list[float], reference_rewards: list[float],
                        tie_tolerance: float = 1e-6) -> list[float]:
    """Per prompt: 1 for a win over the reference, 0.5 for a tie, 0 for a loss (their mean is the win rate
    with ties counted half)."""
    return [0.5 if abs(p - r) <= tie_tolerance else float(p > r) for p, r in zip(policy_rewards, reference_rewards)]


def checkable_scores(prompts: list, completions: list[str], metadata: dict[str, dict] | None = None
                     ) -> tuple[list[float | None], list[float | None]]:
    """Checkable held-out signals per completion: (answer correctness, format compliance), None where none applies.

    Correctness is the share of a prompt's known answers the completion states: the numeric answer
    of an arithmetic prompt (its final number, or the number after "answer is"), and each required
    fact of a factual prompt (any alias, as whole words). Format compliance is the share of the
    prompt's machine-checkable constraints it meets ("in one sentence", "reply with only a number",
    "start with ..."). Both read the answers and constraints written with the bundled prompts
    (``prompts.jsonl``; pass ``metadata`` keyed by normalized prompt text for others) and use the
    offline judge's checkers, but none of the judge's relevance, coherence or verbosity terms: they
    say whether the answer is right and the format kept, not how the judge likes the text.
    """
    meta_by_prompt = oj.load_prompt_metadata() if metadata is None else metadata
    correct: list[float | None] = []
    formatted: list[float | None] = []
    for prompt, completion in zip(prompts, completions):
        text = prompt_text(prompt)
        meta = meta_by_prompt.get(oj.normalize(text), {})
        content: list[bool] = []
        answer = meta.get("answer")
        if answer is not None and not isinstance(answer, str):
            value = oj.final_number(completion)
            content.append(value is not None and abs(value - float(answer)) <= 1e-6 * max(1.0, abs(float(answer))))
        content += [oj.has_fact(aliases, completion) for aliases in meta.get("facts", [])]
        constraint = meta.get("constraint")
        constraints = (constraint if isinstance(constraint, list) else [constraint]) if constraint else []
        checks = [oj.check_constraint(c, completion) for c in constraints]
        correct.append(sum(content) / len(content) if content else None)
        formatted.append(sum(checks) / len(checks) if checks else None)
    return correct, formatted


# ----------------------------------------------------------------------------- log-probs
@contextmanager
def eval_mode(model):
    """Put ``model`` in eval mode for the block and restore its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def completion_logps(model, sequences: list[tuple[list[int], list[int]]], pad_token_id: int,
                     batch_size: int = 8) -> list[float]:
    """Summed log-prob of each completion given its prompt: ``sequences`` holds (prompt_ids, completion_ids).

    Batched, in eval mode and without gradients, through :mod:`unialign.logprobs`.
    """
    if not sequences:
        return []
    device = next(model.parameters()).device
    out: list[float] = []
    with eval_mode(model):
        impl = "chunked" if chunked_head_is_exact(model) else "full"
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            padded = pad_sequences([p + c for p, c in chunk], [len(p) for p, _ in chunk], pad_token_id)
            mask = padded.target_mask.to(device)
            values = token_logps(model, padded.input_ids.to(device), padded.attention_mask.to(device), mask, impl=impl)
            totals, _ = sequence_logps(values, mask)
            out.extend(totals.tolist())
    return out


def generation_sequences(prompts: list, generations: list[Generation], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, sampled ids incl. the stop token when it stopped) per generation: exactly the tokens sampled."""
    return [(encode_prompt(p, tokenizer), completion_ids(g)) for p, g in zip(prompts, generations)]


def kl_estimate(model, reference, tokenizer, prompts: list, generations: list[Generation],
                batch_size: int = 8) -> float:
    """Mean over the policy's generations y ~ π_θ(·|x) of log π_θ(y|x) − log π_ref(y|x), summed over tokens.

    This is the standard Monte-Carlo estimator of KL(π_θ‖π_ref): unbiased when the generations
    are sampled at temperature 1 (and top_p 1). Under greedy or tempered decoding it is only an
    indicator of how far the policy has moved, and may even be negative.
    """
    if not generations:
        return math.nan
    sequences = generation_sequences(prompts, generations, tokenizer)
    pad = tokenizer.pad_token_id
    policy = completion_logps(model, sequences, pad, batch_size)
    ref = policy if reference is model else completion_logps(reference, sequences, pad, batch_size)
    return sum(p - r for p, r in zip(policy, ref)) / len(policy)


def pair_sequences(pairs: list[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of each row's chosen, then rejected completion: ``2·len(pairs)`` entries.

    Tokenized as training tokenizes them, ``chosen_ended`` / ``rejected_ended`` flags included.
    """
    slots = ["chosen", "rejected"]
    sequences = []
    for row in pairs:
        prompt_ids = encode_prompt(row["prompt"], tokenizer)
        ended = [row.get(slot + ENDED_SUFFIX) is not False for slot in slots]
        completions = encode_completions(row["prompt"], [row[slot] for slot in slots], tokenizer, ended, slots)
        sequences += [(prompt_ids, ids) for ids in completions]
    return sequences


def implicit_pair_stats(model, reference, tokenizer, pairs: list[dict], beta: float,
                        batch_size: int = 8, reference_logps: list[float] | None = None) -> PairStats | None:
    """Implicit-reward accuracy and mean margin on rows with ``prompt``, ``chosen`` and ``rejected``.

    ``reference_logps``: the reference's :func:`completion_logps` of :func:`pair_sequences`, when
    already known (a sweep computes them once for all its runs); ``reference`` is then not run.
    """
    if not pairs:
        return None
    sequences = pair_sequences(pairs, tokenizer)
    pad = tokenizer.pad_token_id
    policy = completion_logps(model, sequences, pad, batch_size)
    if reference_logps is not None:
        if len(reference_logps) != len(sequences):
            raise ValueError(f"{len(reference_logps)} reference log-probs for {len(sequences)} pair completions")
        ref = reference_logps
    else:
        ref = policy if reference is model else completion_logps(reference, sequences, pad, batch_size)
    ratios = [p - r for p, r in zip(policy, ref)]
    return pair_stats(ratios[0::2], ratios[1::2], beta)


# ----------------------------------------------------------------------------- evaluation
def evaluate(
    model,
    reference,
    tokenizer,
    prompts: list,
    reward: RewardSource,
    *,
    generation: GenerationConfig | None = None,
    pairs: list[dict] | None = None,
    beta: float = DEFAULT_BETA,
    progress: bool = True,
    tie_tolerance: float = 1e-6,
    samples_per_prompt: int = 1,
) -> EvalReport:
    """Compare ``model`` with ``reference`` on ``prompts`` under ``reward`` (docs/methods.md, evaluation).

    Both models generate one completion per prompt with ``generation`` (default: greedy, 128 new
    tokens). Reports mean/std reward of each side, the per-prompt win/tie/loss rate (a tie when the
    rewards differ by at most ``tie_tolerance``), the KL estimate of :func:`kl_estimate` on the
    policy's generations (the standard Monte-Carlo estimator: unbiased when sampling at temperature 1,
    an indicator under greedy decoding), mean completion length and EOS fraction, and, with ``pairs``,
    implicit-reward accuracy and margin with ``beta``. ``model`` and ``reference`` may be the same
    object; then the reference's generations are the policy's.

    ``samples_per_prompt`` > 1 (with sampling) draws that many completions per prompt from each
    model; each policy sample is compared with the reference sample of the same index, and the
    report gives the mean paired reward difference with its standard error. With greedy decoding
    (temperature 0) it is refused: the samples would be identical copies, not independent draws.

    Raises:
        ValueError: for no prompts, ``samples_per_prompt`` < 1, or > 1 under greedy decoding.
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be at least 1, got {samples_per_prompt}")
    if not prompts:
        raise ValueError("no prompts to evaluate; evaluation needs at least one prompt")
    config = generation or GenerationConfig(temperature=0, max_new_tokens=128)
    check_distinct_samples(config.temperature, samples_per_prompt, "samples_per_prompt")
    num_prompts = len(prompts)
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    config = GenerationConfig(**{**asdict(config), "num_return_sequences": 1})
    policy_gens = [g[0] for g in generate(model, tokenizer, prompts, config, progress, desc="policy")]
    if reference is model:
        reference_gens = policy_gens
    else:
        reference_gens = [g[0] for g in generate(reference, tokenizer, prompts, config, progress, desc="reference")]
    policy_rewards = [float(r) for r in reward(prompts, [g.text for g in policy_gens])] if prompts else []
    reference_rewards = [float(r) for r in reward(prompts, [g.text for g in reference_gens])] if prompts else []
    outcomes = compare(policy_rewards, reference_rewards, tie_tolerance)
    mean_diff, stderr = paired_difference(policy_rewards, reference_rewards)
    samples = [
        {"prompt": p, "policy": pg.text, "reference": rg.text, "policy_reward": pr, "reference_reward": rr}
        for p, pg, rg, pr, rr in zip(prompts, policy_gens, reference_gens, policy_rewards, reference_rewards)
    ]
    return EvalReport(
        num_prompts=num_prompts,
        samples_per_prompt=samples_per_prompt,
        mean_difference=mean_diff,
        difference_stderr=stderr,
        reward_name=getattr(reward, "name", type(reward).__name__),
        policy=side_stats(policy_rewards, policy_gens),
        reference=side_stats(reference_rewards, reference_gens),
        outcomes=outcomes,
        kl=kl_estimate(model, reference, tokenizer, prompts, policy_gens, config.batch_size),
        beta=beta,
        pairs=implicit_pair_stats(model, reference, tokenizer, pairs or [], beta, config.batch_size),
        settings={
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_new_tokens": config.max_new_tokens,
            "seed": config.seed,
        },
        samples=samples,
    )


# ----------------------------------------------------------------------------- paths and CLI
def resolve_run_model(path: str) -> str:
    """A run directory's ``model`` folder when it has one, else ``path`` unchanged."""
    candidate = Path(path) / "model"
    return str(candidate) if candidate.is_dir() else path


def run_config(path: str) -> dict[str, Any]:
    """The ``config.json`` a training run wrote next to its model, or {} when there is none."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return {}
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}


def read_source_rows(source) -> list[dict[str, Any]]:
    """Rows of any source :func:`unialign.data.sources.resolve_source` accepts, ``test`` split by default.

    Evaluation reads held-out rows: ``bundled:<format>`` means ``bundled:<format>:test``, and hub
    datasets and ``DatasetDict``s give their ``test`` split.
    """
    return read_rows(source, split="test")


def load_prompts(source: str, limit: int | None = None) -> list:
    """The ``prompt`` column of ``source`` (see :func:`read_source_rows`), first ``limit`` rows.

    Each row is checked by the prompt-only validator training uses (``unialign.data.formats``).

    Raises:
        DataError: when ``source`` has no rows, or a row has no valid ``prompt`` (naming row and field).
    """

    rows = read_source_rows(source)
    if not rows:
        raise DataError("has no rows; evaluation needs at least one prompt", source=str(source))
    prompts = [validate_row(row, "prompt", i, str(source)).prompt for i, row in enumerate(rows)]
    return prompts[:limit] if limit is not None else prompts


def load_pairs(source: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Pairwise rows of ``source``, first ``limit`` rows, each with an explicit ``prompt``.

    Each row is checked by the pairwise validator training uses, so TRL's implicit-prompt rows are
    split on their shared messages as training splits them.

    Raises:
        DataError: naming the row and field of the first row that is not a valid pair.
    """
    rows = read_source_rows(source)
    pairs = []
    for i, row in enumerate(rows):
        example = validate_row(row, "pairwise", i, str(source))
        pairs.append({**row, "prompt": example.prompt, "chosen": example.completions[0],
                      "rejected": example.completions[1]})
    return pairs[:limit] if limit is not None else pairs


def default_reference(model_path: str) -> str:
    """The reference a run was trained against, read from its ``config.json``."""
    config = run_config(model_path)
    reference = config.get("ref_model_name_or_path") or config.get("model_name_or_path")
    if not reference:
        raise ValueError(f"{model_path}: no run config.json to read the reference from; pass a reference model")
    return reference


def evaluate_paths(
    model_path: str,
    reference_path: str | None = None,
    prompts_source: str = EVAL_PROMPTS,
    reward: str | RewardSource = "offline",
    out: str | Path | None = None,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    limit: int | None = None,
    batch_size: int = 8,
    beta: float | None = None,
    pairs: str | None = None,
    progress: bool = True,
    device: str | None = None,
    samples_per_prompt: int = 1,
) -> EvalReport:
    """Load models, prompts and reward from paths/specs, run :func:`evaluate`, write ``eval.json`` and ``eval.md``.

    ``model_path`` may be a run directory (its ``model`` folder is loaded). ``reference_path``
    defaults to the reference named in the run's ``config.json``; ``beta`` to the run's beta, else
    0.1. ``out`` defaults to ``<run dir>/eval`` for a run directory, else ``./eval``. Models run on
    ``device`` (default: CUDA when available, else CPU).

    Settings, prompts and pairs are checked before any model loads.
    """
    # Here, not at the top: `unialign eval --help` builds its parser from this module, without transformers.
    from unialign.models import load_model, load_tokenizer
    from unialign.rewards.sources import load_reward

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1; got {limit}")
    generation = GenerationConfig(temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size)
    check_distinct_samples(temperature, samples_per_prompt, "samples_per_prompt")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be at least 1, got {samples_per_prompt}")
    prompts = load_prompts(prompts_source, limit)
    pair_rows = load_pairs(pairs, limit) if pairs else None
    config = run_config(model_path)
    policy_dir = resolve_run_model(model_path)
    reference_dir = resolve_run_model(reference_path) if reference_path else default_reference(model_path)
    if beta is None:
        beta = config.get("beta") or DEFAULT_BETA
    tokenizer = load_tokenizer(policy_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(policy_dir).to(device)
    same = Path(reference_dir).resolve() == Path(policy_dir).resolve()
    reference = model if same else load_model(reference_dir).to(device)
    report = evaluate(
        model,
        reference,
        tokenizer,
        prompts,
        load_reward(reward),
        generation=generation,
        pairs=pair_rows,
        beta=beta,
        progress=progress,
        samples_per_prompt=samples_per_prompt,
    )
    report.settings.update({"model": policy_dir, "reference": reference_dir, "prompts": prompts_source})
    write_report(report, _default_out(model_path) if out is None else out)
    return report


def _default_out(model_path: str) -> Path:
    return Path(model_path) / "eval" if (Path(model_path) / "model").is_dir() else Path("eval")


def write_report(report: EvalReport, out: str | Path) -> tuple[Path, Path]:
    """Write ``eval.json`` and ``eval.md`` into folder ``out``; returns their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "eval.json", folder / "eval.md"
    json_path.write_text(jsonfile.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(report.to_markdown(), encoding="utf-8")
    return json_path, md_path


def run_eval_cli(args: argparse.Namespace) -> int:
    """Run ``unialign eval`` from parsed arguments; prints the summary and returns 0.

    The checks :func:`evaluate_paths` makes on its keyword names run here first on the flags' names.
    """
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1; got {args.limit}")
    if args.samples_per_prompt < 1:
        raise ValueError(f"--samples-per-prompt must be at least 1; got {args.samples_per_prompt}")
    check_distinct_samples(args.temperature, args.samples_per_prompt, "--samples-per-prompt", "--temperature")
    out = Path(args.out) if args.out else _default_out(args.model)
    report = evaluate_paths(
        args.model,
        args.reference,
        args.prompts,
        args.judge,
        out,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        limit=args.limit,
        batch_size=args.batch_size,
        beta=args.beta,
        pairs=args.pairs,
        samples_per_prompt=args.samples_per_prompt,
    )
    print(report.to_markdown(max_samples=0), end="")
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0


__all__ = [
    "EvalReport",
    "PairStats",
    "SideStats",
    "WinTieLoss",
    "checkable_scores",
    "compare",
    "evaluate",
    "evaluate_paths",
    "kl_estimate",
    "implicit_pair_stats",
    "per_prompt_outcomes",
    "run_eval_cli",
]
