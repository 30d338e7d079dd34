"""Build a reward source from a short spec string, the one way every command names a reward.

Specs: ``offline`` (the offline judge), ``callable:module:function`` (imported only when named),
``reward-model:PATH`` (a sequence-classification checkpoint), ``llm-judge:MODEL`` (a causal LM asked to grade).
"""

from __future__ import annotations

import importlib
import logging
import re

import torch

from unialign.data.tokenize import encode_completion, encode_prompt
from unialign.generation import GenerationConfig, generate
from unialign.models import load_model, load_tokenizer
from unialign.rewards.base import Prompt, RewardSource, check_lengths, prompt_text
from unialign.rewards.offline_judge import OfflineJudge

logger = logging.getLogger(__name__)


class CallableReward(RewardSource):
    """Wraps a Python function ``f(prompts, completions) -> list[float]``."""

    def __init__(self, function, name: str, bounds: tuple[float, float] | None = None):
        self.function, self.name, self.bounds = function, name, bounds

    def __call__(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        check_lengths(prompts, completions)
        values = [float(v) for v in self.function(prompts, completions)]
        if len(values) != len(completions):
            raise ValueError(
                f"reward function {self.name} returned {len(values)} values for {len(completions)} completions"
            )
        return values


class RewardModel(RewardSource):
    """A sequence-classification checkpoint scoring (prompt, completion) with its own tokenizer and chat template."""

    def __init__(self, path: str, batch_size: int = 8, trust_remote_code: bool = False):

        self.name, self.bounds, self.batch_size = f"reward-model:{path}", None, batch_size
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        self.model = load_model(path, kind="sequence_classifier", trust_remote_code=trust_remote_code).eval()
        if torch.cuda.is_available():
            self.model.to("cuda")

    def encode(self, prompt: Prompt, completion: str) -> list[int]:
        """Token ids the reward model reads for one (prompt, completion), with its own tokenizer.

        The layout unialign trains reward models on for conversational prompts: the prompt through the
        reward model's chat template with the generation prompt, then the completion and EOS. A string
        prompt becomes one user message (as third-party reward models expect; a unialign reward model
        trained on raw string prompts saw no template); without a template, the last user message's
        text is used. The score is
        read at that EOS, so a template's trailing newline after the end-of-turn token must not be
        appended here.
        """

        if not getattr(self.tokenizer, "chat_template", None):
            prompt = prompt_text(prompt)  # no template: the plain text of the last user turn
        elif isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        return encode_prompt(prompt, self.tokenizer) + encode_completion(prompt, completion, self.tokenizer)

    @torch.no_grad()
    def __call__(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        check_lengths(prompts, completions)
        scores = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(prompts), self.batch_size):
            seqs = [
                self.encode(p, c)
                for p, c in zip(prompts[start : start + self.batch_size], completions[start : start + self.batch_size])
            ]
            width = max(map(len, seqs))
            device = next(self.model.parameters()).device
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, 0]
            scores.extend(logits.float().tolist())
        return scores


JUDGE_TEMPLATE = (
    "Rate how well the answer responds to the question, from 1 (useless or wrong) to 10 (correct, clear and "
    "complete).\n\nQuestion: {prompt}\n\nAnswer: {completion}\n\nReply with the number only."
)


class LLMJudge(RewardSource):
    """A causal LM prompted to grade each answer from 1 to 10; the first integer in its reply is the score.

    Replies with no number in range score the lower bound and are counted in ``unparseable`` (and
    logged), so a judge that cannot follow the format shows up instead of silently averaging in.
    """

    def __init__(
        self,
        model: str,
        template: str = JUDGE_TEMPLATE,
        bounds: tuple[float, float] = (1.0, 10.0),
        batch_size: int = 8,
        trust_remote_code: bool = False,
    ):

        self.name, self.bounds, self.template, self.batch_size = f"llm-judge:{model}", bounds, template, batch_size
        self.tokenizer = load_tokenizer(model, trust_remote_code)
        self.model = load_model(model, trust_remote_code=trust_remote_code).eval()
        self.unparseable = 0

    def __call__(self, prompts: list[Prompt], completions: list[str]) -> list[float]:

        check_lengths(prompts, completions)
        questions = [
            [{"role": "user", "content": self.template.format(prompt=prompt_text(p), completion=c)}]
            for p, c in zip(prompts, completions)
        ]
        config = GenerationConfig(max_new_tokens=6, temperature=0, batch_size=self.batch_size)
        replies = [group[0].text for group in generate(self.model, self.tokenizer, questions, config, progress=False)]
        return [self.parse(reply) for reply in replies]

    def parse(self, reply: str) -> float:
        """The first integer within the bounds, or the lower bound (counted as unparseable)."""
        low, high = self.bounds
        for match in re.findall(r"-?\d+", reply):
            if low <= int(match) <= high:
                return float(match)
        self.unparseable += 1
        logger.warning("%s: unparseable reply %r (%d so far)", self.name, reply[:40], self.unparseable)
        return float(low)


class WeightedReward(RewardSource):
    """A weighted sum of named reward sources, ``r = Σ_i w_i·r_i``, keeping each source's own values.

    Args:
        components: ``(name, source, weight)`` triples; names are unique and label the log columns
            (``reward/<name>/mean``).
    """

    def __init__(self, components: list[tuple[str, RewardSource, float]]):
        if not components:
            raise ValueError("a weighted reward needs at least one source")
        self.components = components
        self.name = " + ".join(f"{w:g}*{name}" for name, _, w in components) if len(components) > 1 \
            else components[0][1].name
        bounds = [source.bounds for _, source, _ in components]
        if all(b is not None for b in bounds):
            self.bounds = (
                sum(min(w * lo, w * hi) for (_, _, w), (lo, hi) in zip(components, bounds)),
                sum(max(w * lo, w * hi) for (_, _, w), (lo, hi) in zip(components, bounds)),
            )
        else:
            self.bounds = None

    def score(self, prompts: list[Prompt], completions: list[str]) -> dict[str, list[float]]:
        """Each source's rewards, by name (unweighted)."""
        return {name: list(source(prompts, completions)) for name, source, _ in self.components}

    def combine(self, per_source: dict[str, list[float]]) -> list[float]:
        """The weighted sum of :meth:`score`'s values."""
        columns = [[w * v for v in per_source[name]] for name, _, w in self.components]
        return [sum(values) for values in zip(*columns)]

    def __call__(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        return self.combine(self.score(prompts, completions))


def source_name(spec: str | RewardSource) -> str:
    """A short column name for a source: a callable's function name, else the spec (or the source's name)."""
    if isinstance(spec, RewardSource):
        return spec.name
    kind, _, rest = spec.partition(":")
    return rest.rpartition(":")[2] if kind == "callable" else spec


def load_weighted_reward(spec) -> WeightedReward:
    """A :class:`WeightedReward` from a spec string, a source, or a list of ``{source, weight, name}`` entries.

    ``reward: [{source: callable:mod:f, weight: 1.0}, {source: offline, weight: 0.5, name: judge}]``;
    ``weight`` defaults to 1, ``name`` to the function's name (or the spec). Bad entries name their index.
    """
    if isinstance(spec, WeightedReward):
        return spec
    if isinstance(spec, (str, RewardSource)):
        return WeightedReward([(source_name(spec), load_reward(spec), 1.0)])
    if not isinstance(spec, list) or not spec:
        raise ValueError(f"config key 'reward' must be a spec string or a non-empty list of {{source, weight}}, "
                         f"got {spec!r}")
    components, seen = [], set()
    for index, entry in enumerate(spec):
        where = f"config key 'reward'[{index}]"
        if isinstance(entry, (str, RewardSource)):
            entry = {"source": entry}
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping with 'source' and 'weight', got {entry!r}")
        unknown = sorted(set(entry) - {"source", "weight", "name"})
        if unknown:
            raise ValueError(f"{where} has unknown field {unknown[0]!r}; the fields are source, weight, name")
        if "source" not in entry:
            raise ValueError(f"{where} has no 'source' (e.g. callable:module:function)")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight != weight:
            raise ValueError(f"{where} field 'weight' must be a number, got {weight!r}")
        name = str(entry.get("name") or source_name(entry["source"]))
        if name in seen:
            raise ValueError(f"{where}: the name {name!r} is used twice; give one of them a 'name'")
        seen.add(name)
        components.append((name, load_reward(entry["source"]), float(weight)))
    return WeightedReward(components)


def load_reward(spec: str | RewardSource) -> RewardSource:
    """Turn a spec string into a reward source (a RewardSource passes through; a list gives a weighted sum)."""
    if isinstance(spec, RewardSource):
        return spec
    if isinstance(spec, list):
        return load_weighted_reward(spec)
    if not isinstance(spec, str):
        raise ValueError(f"a reward spec must be a string or a list of {{source, weight}}, got {spec!r}")
    kind, _, rest = spec.partition(":")
    if kind == "offline":

        return OfflineJudge()
    if kind == "callable":
        module, _, function = rest.rpartition(":")
        if not module:
            raise ValueError(f"reward spec {spec!r}: write callable:module.path:function")
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError as err:
            raise ValueError(f"reward spec {spec!r}: cannot import module {module!r} ({err})") from None
        if not callable(getattr(imported, function, None)):
            raise ValueError(f"reward spec {spec!r}: module {module!r} has no function {function!r}")
        return CallableReward(getattr(imported, function), name=rest)
    if kind == "reward-model":
        return RewardModel(rest)
    if kind == "llm-judge":
        return LLMJudge(rest)
    raise ValueError(
        f"unknown reward spec {spec!r}; use offline, callable:module:function, reward-model:PATH or llm-judge:MODEL"
    )


__all__ = ["CallableReward", "LLMJudge", "RewardModel", "WeightedReward", "load_reward", "load_weighted_reward",
           "prompt_text"]
