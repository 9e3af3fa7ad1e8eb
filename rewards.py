"""Rule rewards for GRPO: functions of (completion text, example) -> float. No reward model.

As in DeepSeek-R1, a completion is scored by rules only:
- accuracy: the final answer against the example's "answer", by the math answer grader
  (nanor1/grader.py: numbers, fractions, roots, sets, intervals, tuples, matrices,
  equations and algebra);
- format: the R1 template <think>...</think><answer>...</answer> (and a partial-credit variant);
- language: the share of the chain of thought written in the target language's script;
- length shaping: DAPO's soft overlong penalty and a cosine length reward;
- code: the last ```python block run against the example's test cases in a sandbox
  (nanor1/sandbox.py).
Compose them by name with optional weights: "accuracy,format" or "accuracy:1,format:0.5".
A new rule is a function of (completion, example) added to REWARDS.

grpo.py adds to each example the completion's length in tokens ("num_tokens"), the limit
("max_tokens"), the overlong buffer and the default language, so the length rules stay
functions of the same pair.

Model text is hostile input: the grader never gives it to eval, exec or sympify, and model
code runs only in the sandbox, one locked-down process per test.

Deliberate simplifications: languages are told apart by script, so English and French are
one; the rules are pure functions of the final text, so nothing rewards a process.
"""

import math
import os
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor

from nanor1 import grader, sandbox

# ----------------------------------------------------------------------------------------
# the rules


def accuracy(completion, example):
    """1 when the final answer equals the example's "answer", else 0."""
    return 1.0 if grader.math_equal(completion, str(example["answer"])) else 0.0


# exactly one <think>...</think> then exactly one <answer>...</answer>, then nothing but
# whitespace (the grader holds the regex: it reads integer answers straight out of it)
FORMAT = grader.R1_FORMAT


def format_reward(completion, example):
    """1 when the completion follows the R1 template exactly, else 0."""
    return 1.0 if FORMAT.fullmatch(completion) else 0.0


def format_tags(completion, example):
    """Partial credit while the template is being learnt: 0.25 for each of the four tags
    that appears exactly once."""
    return sum(completion.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")) / 4


# Language consistency (R1 section 2.3.2): the share of the chain of thought's words that
# are in the target language, told apart by Unicode script. Math, LaTeX commands and
# one-letter variables are not words; each Chinese or Japanese character is one word.
SCRIPTS = {"en": {"LATIN"}, "fr": {"LATIN"}, "de": {"LATIN"}, "es": {"LATIN"}, "it": {"LATIN"}, "pt": {"LATIN"},
           "zh": {"CJK"}, "ja": {"CJK", "HIRAGANA", "KATAKANA"}, "ko": {"HANGUL"}, "ru": {"CYRILLIC"},
           "ar": {"ARABIC"}, "hi": {"DEVANAGARI"}, "el": {"GREEK"}}
SINGLE_CHAR_WORDS = {"CJK", "HIRAGANA", "KATAKANA"}


def script_of(ch):
    """'LATIN', 'CJK', 'CYRILLIC', ... from the character's Unicode name; '' if unnamed."""
    return unicodedata.name(ch, "").split(" ")[0]


def words_by_script(text):
    """[(script, word)] of the letters in text, math and LaTeX left out."""
    text = grader.MATH_BLOCK.sub(" ", text)
    text = re.sub(r"\\[A-Za-z]+", " ", text)
    out = []
    for run in re.findall(r"[^\W\d_]+", text):
        word, script = "", None
        for ch in run + " ":
            s = script_of(ch) if ch != " " else None
            if word and (s != script or script in SINGLE_CHAR_WORDS):
                if not (script == "LATIN" and len(word) == 1):  # x, y: variables
                    out.append((script, word))
                word = ""
            word, script = word + ch if s else word, s
    return out


def language(completion, example):
    """Share of words in <think> written in the script of example["lang"] (default "en");
    0 when the chain of thought has no words."""
    lang = example.get("lang") or "en"
    if lang not in SCRIPTS:
        raise ValueError(f"unknown language {lang!r} (known: {', '.join(sorted(SCRIPTS))})")
    m = re.search(r"<think>(.*?)(</think>|$)", completion, flags=re.DOTALL)
    words = words_by_script(m.group(1) if m else completion)
    if not words:
        return 0.0
    return sum(script in SCRIPTS[lang] for script, _ in words) / len(words)


def overlong(completion, example):
    """DAPO's soft overlong penalty: 0 up to max_tokens - overlong_buffer tokens, then
    linearly down to -1 at max_tokens (and -1 beyond)."""
    n, limit, buffer = example["num_tokens"], example["max_tokens"], example.get("overlong_buffer") or 0
    if buffer <= 0 or n <= limit - buffer:
        return 0.0 if n <= limit else -1.0
    return max(-1.0, (limit - buffer - n) / buffer)


def cosine(completion, example):
    """Accuracy shaped by length with a cosine (Yeo et al., 2025): a correct answer earns
    1 when short down to 0.5 at max_tokens, a wrong one -1 when short up to -0.5 at
    max_tokens, so the model thinks longer only when it is wrong. Use instead of accuracy."""
    c = (1 + math.cos(math.pi * min(example["num_tokens"] / example["max_tokens"], 1.0))) / 2  # 1 -> 0
    return 0.5 + 0.5 * c if accuracy(completion, example) else -0.5 - 0.5 * c


def code(completion, example):
    """Fraction of the example's "tests" that the last ```python block passes."""
    return sandbox.code_reward(completion, example["tests"])


def code_strict(completion, example):
    """1 only when the last ```python block passes every test."""
    return sandbox.code_reward(completion, example["tests"], strict=True)


# ----------------------------------------------------------------------------------------
# composition: "--rewards accuracy,format:0.5" -> a weighted sum, each part logged

REWARDS = {"accuracy": accuracy, "format": format_reward, "format_tags": format_tags, "language": language,
           "overlong": overlong, "cosine": cosine, "code": code, "code_strict": code_strict}
NEEDS = {"accuracy": "answer", "cosine": "answer", "code": "tests", "code_strict": "tests"}  # example fields


def parse_rewards(spec):
    """ "accuracy,format:0.5" -> [("accuracy", fn, 1.0), ("format", fn, 0.5)]; ValueError on bad spec."""
    out = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in REWARDS:
            raise ValueError(f"unknown reward '{name}' (known: {', '.join(sorted(REWARDS))})")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"reward '{name}': weight '{weight}' is not a number") from None
        if not math.isfinite(w):
            raise ValueError(f"reward '{name}': weight '{weight}' is not finite")
        out.append((name, REWARDS[name], w))
    if len({name for name, _, _ in out}) < len(out):
        raise ValueError(f"a reward is named twice in '{spec}'")
    return out


def score(completion, example, rewards):
    """Weighted sum of the rewards -> (total, {name: value}, [error messages]).

    A reward that raises counts as 0 and its error is returned for the caller to log, so
    one odd completion cannot kill a training run.
    """
    total, parts, errors = 0.0, {}, []
    for name, fn, weight in rewards:
        try:
            value = float(fn(completion, example))
            if not math.isfinite(value):
                raise ValueError(f"returned {value}")
        except Exception as e:  # noqa: BLE001 - any failure of a rule is a zero, not a crash
            value = 0.0
            errors.append(f"reward '{name}' raised {type(e).__name__}: {e}")
        parts[name] = value
        total += weight * value
    return total, parts, errors


def score_many(completions, examples, rewards):
    """score() for many completions at once, in threads: code tests and math comparisons run
    in child processes, so a group of 16 is scored in parallel rather than in turn."""
    with ThreadPoolExecutor(max_workers=min(len(completions), 2 * (os.cpu_count() or 1)) or 1) as pool:
        return list(pool.map(lambda ce: score(ce[0], ce[1], rewards), zip(completions, examples)))


def scorer(rewards):
    """A spec ("accuracy,format:0.5") or parse_rewards' list -> score(completions, examples),
    score_many with these rewards: what the sampling engine (nanor1/sampling.py) is handed."""
    rewards = parse_rewards(rewards) if isinstance(rewards, str) else rewards
    return lambda completions, examples: score_many(completions, examples, rewards)
