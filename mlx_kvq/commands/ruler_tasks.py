"""RULER's synthetic long-context tasks, generated from a seed, and its scorer
(pure Python: no model, no tokenizer). `mlx_kvq.eval --ruler` (ruler.py)
renders a ContextPlan into one shared context per (length, seed), fits it to
a token length with the model's tokenizer, and asks every Question against a
copy of the cache that holds the context.

Taken from RULER (NVIDIA/RULER, scripts/data/synthetic and
scripts/eval/synthetic/constants.py; Hsieh et al. 2024):
  * the tasks and their settings (scripts/synthetic.yaml): niah_single_1/2/3
    (one key, haystack of repeated filler / essay / essay, values numbers /
    numbers / uuids), niah_multikey_1 (4 keys in an essay), niah_multikey_2/3
    (haystack of other needles; words -> numbers, uuids -> uuids),
    niah_multivalue (4 values for a key), niah_multiquery (4 keys asked at
    once), vt (1 chain of 4 hops in filler), cwe (10 common words), fwe
    (3 most frequent coded words, zeta distribution with alpha 2);
  * the needle sentence ("One of the special magic numbers for {key} is:
    {value}."), the filler ("The grass is green. ..."), keys as
    adjective-noun pairs and words from `wonderwords`' lists (RULER's source,
    read from the installed package: no download), 7-digit numbers, uuid4s,
    5-letter variable names with 5-digit values, 6-letter coded words;
  * the question templates and answer prefixes (scripts/data/synthetic/
    constants.py), with RULER's singular wording when one value is asked;
  * scoring: string match, case-insensitive, after RULER's postprocessing
    (strip, control characters to newlines): "all" (niah, vt, cwe, fwe) is
    the fraction of expected strings found in the output, "part" (RULER's
    qa) is 1 when any is found.

What differs, so that a length costs about one prefill per scheme:
  * one shared context per (length, seed) holds the items of many questions
    of every chosen task: haystack blocks of the kinds the tasks use
    (filler, Jane Austen's prose for RULER's Paul Graham essays, needles
    with other keys) cycle through the context, and each task's needles and
    chain links sit at random points of random blocks of its kind, so their
    depths span the whole context; every needle's key is unique in the
    context, and the other questions' needles are more distractors than
    RULER's single-needle tasks have;
  * RULER's instruction before the context becomes one introduction naming
    what the context hides; the question and answer prefix of each task
    follow the context as in RULER (naming its list or coded text);
  * cwe and fwe are numbered blocks ("list 3", "coded text 2") of a fixed
    size inside the context, not a context of their own: cwe uses RULER's
    short-context form (10 common words 6 times, 40 others once) without its
    few-shot example; fwe draws 300 coded words;
  * sentences of the prose are split at end punctuation, not with NLTK;
  * decoding is greedy and stops at end of turn, at the task's token cap
    (32-64, RULER allows 30-128) or once every expected string is in the
    output (an "all" score cannot change after that).
"""

import math
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from functools import lru_cache

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
CWE_COMMON, CWE_COMMON_REPEATS, CWE_OTHERS = 10, 6, 40
FWE_WORDS, FWE_ALPHA, FWE_WORD_LEN = 300, 2.0, 6
VT_HOPS = 4


@dataclass(frozen=True)
class Task:
    """One of RULER's synthetic tasks (scripts/synthetic.yaml)."""

    name: str
    family: str  # niah, vt, cwe, fwe
    haystack: str = ""  # noise, essay, needle (niah, vt); cwe/fwe bring their own blocks
    key: str = "words"  # niah: what keys and values are
    value: str = "numbers"
    keys: int = 1  # needles with distinct keys per question (the asked ones first)
    values: int = 1  # values per key
    queries: int = 1  # keys asked at once
    max_tokens: int = 32
    metric: str = "all"


TASKS = {t.name: t for t in (
    Task("niah_single_1", "niah", "noise"),
    Task("niah_single_2", "niah", "essay"),
    Task("niah_single_3", "niah", "essay", value="uuids", max_tokens=48),
    Task("niah_multikey_1", "niah", "essay", keys=4),
    Task("niah_multikey_2", "niah", "needle"),
    Task("niah_multikey_3", "niah", "needle", key="uuids", value="uuids", max_tokens=48),
    Task("niah_multivalue", "niah", "essay", values=4, max_tokens=64),
    Task("niah_multiquery", "niah", "essay", keys=4, queries=4, max_tokens=64),
    Task("vt", "vt", "noise"),
    Task("cwe", "cwe", max_tokens=64),
    Task("fwe", "fwe", max_tokens=32),
)}


def parse_tasks(text: str) -> tuple:
    """Comma-separated task names; "niah" stands for every niah task, "all"
    for every task."""
    names = []
    for part in str(text).split(","):
        part = part.strip()
        if part == "all":
            names += list(TASKS)
        elif part == "niah":
            names += [n for n in TASKS if n.startswith("niah")]
        elif part in TASKS:
            names.append(part)
        else:
            raise ValueError(f"unknown RULER task {part!r}: use 'all', 'niah' or any of "
                             f"{', '.join(TASKS)}")
    return tuple(dict.fromkeys(names))


# -- scoring (RULER scripts/eval) --------------------------------------------------

def postprocess(pred: str) -> str:
    """RULER's postprocess_pred: strip, control characters to newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def string_match_all(pred: str, refs) -> float:
    """Fraction of the expected strings found in the output (case-insensitive)."""
    pred = postprocess(pred).lower()
    return sum(r.lower() in pred for r in refs) / len(refs)


def string_match_part(pred: str, refs) -> float:
    """1 when any expected string is found in the output (case-insensitive)."""
    pred = postprocess(pred).lower()
    return float(max(r.lower() in pred for r in refs))


METRICS = {"all": string_match_all, "part": string_match_part}


# -- word sources --------------------------------------------------------------------

@lru_cache(maxsize=1)
def word_lists() -> dict:
    """wonderwords' noun, adjective and verb lists (RULER's word source)."""
    from wonderwords.random_word import _get_words_from_text_file as words

    return {kind: sorted(set(words(f"{kind}list.txt"))) for kind in ("noun", "adjective", "verb")}


def sentences(text: str) -> list:
    """Prose split into sentences at end punctuation, whitespace collapsed."""
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?])\s+(?=\S)", text) if s]


# -- the shared context ----------------------------------------------------------------

@dataclass
class Question:
    """One question about the shared context: asked after it, scored against
    `answers`."""

    task: str
    text: str  # follows the context (after a newline)
    answer_prefix: str  # starts the assistant's turn
    answers: list
    max_tokens: int
    metric: str = "all"

    def score(self, output: str) -> float:
        return METRICS[self.metric](output, self.answers)


@dataclass
class Block:
    """A stretch of the context: haystack units of one kind with items at
    fractional positions, or a fixed text (a cwe list, an fwe coded text)."""

    kind: str  # noise, essay, needle:<key>:<value>, text
    items: list = field(default_factory=list)  # (fraction, text)
    text: str = ""  # kind "text"
    start: int = 0  # essay: first sentence index


@dataclass
class ContextPlan:
    """What a shared context holds: the introduction, blocks and questions.
    render(n) gives its text with n haystack units spread over the blocks."""

    intro: str
    blocks: list
    questions: list
    essay: list  # sentences
    pools: dict  # needle kind -> distractor needles (grown on demand)
    _pool_rngs: dict = field(default_factory=dict, repr=False)
    _used: set = field(default_factory=set, repr=False)

    @property
    def haystack_blocks(self) -> list:
        return [b for b in self.blocks if b.kind != "text"]

    def _pool(self, kind: str, n: int) -> list:
        pool = self.pools.setdefault(kind, [])
        _, key, value = kind.split(":")
        gen = self._pool_rngs[kind]
        while len(pool) < n:
            pool.append(NEEDLE.format(kind=value, key=gen.unique(key), value=gen.draw(value)))
        return pool

    def _units(self, block: Block, n: int, taken: dict) -> tuple:
        """(units, separator) of a haystack block of n units."""
        if block.kind == "noise":
            return [NOISE] * n, "\n"
        if block.kind == "essay":
            m = len(self.essay)
            return [self.essay[(block.start + i) % m] for i in range(n)], " "
        first = taken.get(block.kind, 0)
        taken[block.kind] = first + n
        return self._pool(block.kind, first + n)[first:first + n], "\n"

    def render(self, n_units: int) -> str:
        hay = self.haystack_blocks
        taken, parts = {}, []
        k = 0
        for block in self.blocks:
            if block.kind == "text":
                parts.append(block.text)
                continue
            n = n_units // len(hay) + (k < n_units % len(hay))
            k += 1
            units, sep = self._units(block, n, taken)
            for frac, text in sorted(block.items, key=lambda x: x[0], reverse=True):
                units.insert(round(frac * n), text)
            if units:
                parts.append(sep.join(units))
        return self.intro + "\n\n" + "\n".join(parts)


class Draws:
    """Values as RULER draws them, unique within one context."""

    def __init__(self, rng: random.Random, used: set):
        self.rng, self.used = rng, used

    def draw(self, kind: str) -> str:
        rng = self.rng
        if kind == "numbers":
            return str(rng.randint(10 ** 6, 10 ** 7 - 1))
        if kind == "words":
            w = word_lists()
            return f"{rng.choice(w['adjective'])}-{rng.choice(w['noun'])}"
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if kind == "var":
            return "".join(rng.choices(string.ascii_uppercase, k=5))
        if kind == "vt_value":
            return str(rng.randint(10000, 99999))
        if kind == "coded":
            return "".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LEN))
        raise ValueError(f"unknown value kind {kind!r}")

    def unique(self, kind: str) -> str:
        while True:
            x = self.draw(kind)
            if x not in self.used:
                self.used.add(x)
                return x


def _niah_question(task: Task, keys: list, values: list) -> Question:
    kind = task.value
    query = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]
    if len(values) == 1:  # RULER's singular wording
        return Question(task.name,
                        f"What is the special magic {kind[:-1]} for {query} mentioned in the "
                        "provided text?",
                        f"The special magic {kind[:-1]} for {query} mentioned in the provided "
                        "text is", values, task.max_tokens, task.metric)
    return Question(task.name,
                    f"What are all the special magic {kind} for {query} mentioned in the "
                    "provided text?",
                    f"The special magic {kind} for {query} mentioned in the provided text "
                    "are", values, task.max_tokens, task.metric)


def _intro(tasks) -> str:
    fams = {t.family for t in tasks}
    lines = []
    kinds = sorted({t.value for t in tasks if t.family == "niah"}, reverse=False)
    if kinds:
        what = " and ".join(kinds)
        lines.append(f"Some special magic {what} are hidden within the following text. Make "
                     f"sure to memorize it. I will quiz you about the {what} afterwards.")
    if "vt" in fams:
        lines.append("Memorize and track the chain(s) of variable assignment hidden in the "
                     "following text.")
    if "cwe" in fams:
        lines.append("The text also holds numbered lists of words. In these words, some "
                     "appear more often than others. Memorize the ones that appear most often.")
    if "fwe" in fams:
        lines.append("The text also holds coded texts: track the frequency of each coded "
                     "word in them.")
    return " ".join(lines)


def _cwe(draws: Draws, number: int):
    w = word_lists()
    words = draws.rng.sample(sorted(set(w["noun"] + w["adjective"] + w["verb"])),
                             CWE_COMMON + CWE_OTHERS)
    common = words[:CWE_COMMON]
    entries = common * CWE_COMMON_REPEATS + words[CWE_COMMON:]
    draws.rng.shuffle(entries)
    text = (f"Below is a numbered list of words, list {number}. In these words, some appear "
            "more often than others. Memorize the ones that appear most often.\n"
            + " ".join(f"{i + 1}. {x}" for i, x in enumerate(entries)))
    q = Question("cwe", f"Question: What are the {CWE_COMMON} most common words in list "
                 f"{number} above?", f"Answer: The top {CWE_COMMON} words that appear most "
                 "often in the list are:", common, TASKS["cwe"].max_tokens)
    return text, q


def _fwe(draws: Draws, number: int):
    vocab = [draws.unique("coded") for _ in range(int(math.sqrt(FWE_WORDS)) + 2)]
    vocab[0] = "..."  # RULER: the top-ranked word is noise
    zeta = sum(k ** -FWE_ALPHA for k in range(1, 100000))
    counts = [int(FWE_WORDS * k ** -FWE_ALPHA / zeta) for k in range(1, len(vocab) + 1)]
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    draws.rng.shuffle(words)
    text = (f"Read the following coded text, coded text {number}, and track the frequency "
            "of each coded word. Find the three most frequently appeared coded words. "
            + " ".join(words))
    q = Question("fwe", "Question: Do not provide any explanation. Please ignore the dots "
                 "'....'. What are the three most frequently appeared words in coded text "
                 f"{number} above?", "Answer: According to the coded text above, the three "
                 "most frequently appeared words are:", vocab[1:4], TASKS["fwe"].max_tokens)
    return text, q


def spread(n: int, names) -> dict:
    """n questions over the tasks, in order: {task: count}."""
    names = list(names)
    return {t: n // len(names) + (i < n % len(names)) for i, t in enumerate(names)}


def plan_context(seed: int, counts: dict, essay: list, blocks_per_kind: int = 1) -> ContextPlan:
    """The items, blocks and questions of one shared context: counts =
    {task: questions}. Deterministic in seed."""
    if not essay and any(TASKS[t].haystack == "essay" for t, n in counts.items() if n):
        raise ValueError("the essay haystack needs prose: no sentences given")
    rng = random.Random(seed)
    used = set()
    draws = Draws(rng, used)
    tasks = [TASKS[t] for t, n in counts.items() if n]
    kinds = []
    for t in tasks:
        kind = t.haystack if t.haystack != "needle" else f"needle:{t.key}:{t.value}"
        if kind and kind not in kinds:
            kinds.append(kind)
    kinds = kinds or ["noise"]
    blocks = [Block(k, start=rng.randrange(len(essay)) if essay else 0)
              for _ in range(blocks_per_kind) for k in kinds]
    by_kind = {k: [b for b in blocks if b.kind == k] for k in kinds}

    def place(kind, text):
        rng.choice(by_kind[kind]).items.append((rng.random(), text))

    questions, texts = [], []
    for t in tasks:
        for _ in range(counts[t.name]):
            if t.family == "niah":
                kind = t.haystack if t.haystack != "needle" else f"needle:{t.key}:{t.value}"
                keys = [draws.unique(t.key) for _ in range(t.keys)]
                values = [[draws.unique(t.value) for _ in range(t.values)] for _ in keys]
                for key, vals in zip(keys, values):
                    for v in vals:
                        place(kind, NEEDLE.format(kind=t.value, key=key, value=v))
                asked = keys[:t.queries]
                questions.append(_niah_question(
                    t, asked, [v for vals in values[:t.queries] for v in vals]))
            elif t.family == "vt":
                names = [draws.unique("var") for _ in range(VT_HOPS + 1)]
                value = draws.unique("vt_value")
                links = [f"VAR {names[0]} = {value}"] + [
                    f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(VT_HOPS)]
                spots = sorted((blocks.index(rng.choice(by_kind["noise"])), rng.random())
                               for _ in links)
                for (b, frac), link in zip(spots, links):
                    blocks[b].items.append((frac, link))
                questions.append(Question(
                    "vt", f"Question: Find all variables that are assigned the value {value} "
                    "in the text above.", "Answer: According to the chain(s) of variable "
                    f"assignment in the text above, {VT_HOPS + 1} variables are assigned the "
                    f"value {value}, they are:", names, t.max_tokens))
            else:
                texts.append(t.family)
    # cwe lists and fwe coded texts: blocks between the haystack blocks,
    # numbered in the order they appear.
    rng.shuffle(texts)
    slots = sorted(rng.randrange(len(blocks) + 1) for _ in texts)
    numbers = {"cwe": 0, "fwe": 0}
    for shift, (slot, fam) in enumerate(zip(slots, texts)):
        numbers[fam] += 1
        text, q = (_cwe if fam == "cwe" else _fwe)(draws, numbers[fam])
        blocks.insert(slot + shift, Block("text", text=text))
        questions.append(q)
    plan = ContextPlan(_intro(tasks), blocks, questions, essay, {}, _used=used)
    for kind in kinds:
        if kind.startswith("needle:"):
            plan._pool_rngs[kind] = Draws(random.Random(f"{seed}:{kind}"), used)
    return plan
