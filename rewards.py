"""Rule rewards for GRPO: pure functions of (completion text, example) -> float.

No reward model, as in DeepSeek-R1: the accuracy of the final answer against the
example's reference, and the format of the R1 template. Standard library only; model text
is hostile input and is never evaluated.

Deliberate simplification (for now): the answer checker compares numbers exactly
(integers, decimals, fractions, thousands separators, percentages) and anything else as
normalised strings. Algebraic equivalence, sets and intervals, code test cases, language
consistency and length shaping are the subject of the rewards issue.

Compose rewards by name with optional weights: "accuracy,format" or "accuracy:1,format:0.5".
"""

import re
from fractions import Fraction

# ----------------------------------------------------------------------------------------
# extracting the final answer


def last_boxed(text):
    r"""Content of the last \boxed{...} (or \fbox{...}), nested braces allowed; None if absent."""
    start = max(text.rfind(r"\boxed{"), text.rfind(r"\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: no answer rather than a guess


def extract_answer(completion):
    r"""The final answer of a completion: the last <answer> block, else the last \boxed{},
    else GSM8K's "#### n". Only text after the last </think> counts: answers tried while
    thinking are not the answer."""
    text = completion.rsplit("</think>", 1)[1] if "</think>" in completion else completion
    blocks = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    if blocks:
        inner = blocks[-1]
        boxed = last_boxed(inner)
        return (boxed if boxed is not None else inner).strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = re.findall(r"####\s*([^\n]+)", text)
    return m[-1].strip() if m else None


# ----------------------------------------------------------------------------------------
# comparing answers

NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")


def normalize(s):
    r"""Strip the decoration that does not change a value: $, \text{}, \left/\right, spaces,
    a trailing period, "x =" in front, thousands separators."""
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(left|right|!|,|;|:|displaystyle)", "", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,234,567 -> 1234567
        s = s.replace(",", "")
    return s


def to_number(s):
    r"""Exact value of "12", "-3.5", "7/2", "\frac{7}{2}", "50%" (= 1/2); None otherwise."""
    percent = s.endswith(r"\%") or s.endswith("%")
    s = s.removesuffix(r"\%").removesuffix("%")
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"(-?)(-?\d+)/(-?\d+)", s)
    if m:
        if int(m.group(3)) == 0:
            return None
        value = Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1)
    elif NUMBER.fullmatch(s) and len(s) < 100:  # refuse absurdly long digit strings
        value = Fraction(s)
    else:
        return None
    return value / 100 if percent else value


def math_equal(pred, gold):
    """True when pred (a whole completion or a bare answer) has the same value as gold."""
    if pred is None or gold is None:
        return False
    answer = extract_answer(pred) if ("<answer>" in pred or r"\boxed" in pred or "####" in pred) else pred
    if answer is None:
        return False
    a, b = normalize(answer), normalize(str(gold))
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        return x == y
    return a != "" and a == b


# ----------------------------------------------------------------------------------------
# the rewards


def accuracy(completion, example):
    """1 when the final answer equals the example's "answer", else 0."""
    return 1.0 if math_equal(extract_answer(completion), example["answer"]) else 0.0


# exactly one <think>...</think> then exactly one <answer>...</answer>, then nothing but
# whitespace: fullmatch with DOTALL, so no line-anchor trick lets trailing text through
FORMAT = re.compile(r"\s*<think>((?!</?think>).)*</think>\s*<answer>((?!</?answer>|</?think>).)*</answer>\s*",
                    flags=re.DOTALL)


def format_reward(completion, example):
    """1 when the completion follows the R1 template exactly, else 0."""
    return 1.0 if FORMAT.fullmatch(completion) else 0.0


REWARDS = {"accuracy": accuracy, "format": format_reward}


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
        out.append((name, REWARDS[name], w))
    if not out:
        raise ValueError("no rewards given")
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
        except Exception as e:  # noqa: BLE001 - any failure of a rule is a zero, not a crash
            value = 0.0
            errors.append(f"reward '{name}' raised {type(e).__name__}: {e}")
        parts[name] = value
        total += weight * value
    return total, parts, errors
