"""The starter rule rewards: answer extraction, the accuracy check, the R1 format, composition."""

import pytest

import rewards as R


@pytest.mark.parametrize("completion, want", [
    ("<think>2+2 is 4</think><answer>4</answer>", "4"),
    ("<think>maybe <answer>5</answer></think> <answer>4</answer>", "4"),     # only after </think>
    ("<think>x</think><answer>so \\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
    ("we get \\boxed{x^{2}+1} and \\boxed{7}", "7"),                         # the last box
    ("\\boxed{\\frac{a}{\\sqrt{b}}}", "\\frac{a}{\\sqrt{b}}"),             # nested braces
    ("Natalia sold 48 clips.\n#### 72", "72"),                              # GSM8K
    ("\\boxed{12", None),                                                   # unbalanced: no answer
    ("<think>the answer is 4</think>", None),
])
def test_extract_answer(completion, want):
    assert R.extract_answer(completion) == want


@pytest.mark.parametrize("pred, gold, want", [
    ("72", "72", True), ("1,234", "1234", True), ("$1,234.50$", "1234.5", True), ("-3", "-3.0", True),
    ("\\frac{1}{2}", "0.5", True), ("\\dfrac{3}{4}", "3/4", True), ("50\\%", "0.5", True), ("x = 5", "5", True),
    ("\\text{5}", "5", True), ("5.", "5", True), ("\\left(1,2\\right)", "(1,2)", True),
    ("73", "72", False), ("0.33", "1/3", False), ("", "0", False), ("1/0", "0", False),
    ("<think>4</think><answer>\\boxed{6}</answer>", "6", True),              # a whole completion
    ("__import__('os').system('echo hi')", "0", False),
    ("1" * 5000, "1" * 5000, True),                                         # long strings: compared as text, not parsed
])
def test_math_equal(pred, gold, want):
    assert R.math_equal(pred, gold) is want


@pytest.mark.parametrize("completion, want", [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("<think>\nline\nline\n</think>\n<answer>\n4\n</answer>\n", 1.0),
    ("<think>a</think><answer>b</answer> extra", 0.0),                       # text after </answer>
    ("<think>a</think><answer>b</answer>\nmore\n", 0.0),                     # a line after (no MULTILINE trick)
    ("<think>a</think><think>b</think><answer>c</answer>", 0.0),             # doubled think
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),           # doubled answer
    ("<think>a<think>b</think></think><answer>c</answer>", 0.0),             # nested
    ("<answer>b</answer><think>a</think>", 0.0),                             # wrong order
    ("<think>a</think>", 0.0), ("<answer>b</answer>", 0.0), ("", 0.0),
    ("preamble <think>a</think><answer>b</answer>", 0.0),
])
def test_format_reward(completion, want):
    assert R.format_reward(completion, {}) == want


def test_accuracy_reward_uses_the_example_answer():
    assert R.accuracy("<think>3+4</think><answer>7</answer>", {"answer": "7"}) == 1.0
    assert R.accuracy("<think>3+4 = 7</think><answer>8</answer>", {"answer": "7"}) == 0.0


def test_parse_rewards_and_weighted_score():
    spec = R.parse_rewards("accuracy, format:0.5")
    assert [(n, w) for n, _, w in spec] == [("accuracy", 1.0), ("format", 0.5)]
    total, parts, errors = R.score("<think>x</think><answer>7</answer>", {"answer": "7"}, spec)
    assert (total, parts, errors) == (1.5, {"accuracy": 1.0, "format": 1.0}, [])
    with pytest.raises(ValueError, match="unknown reward 'acc'"):
        R.parse_rewards("acc")
    with pytest.raises(ValueError, match="not a number"):
        R.parse_rewards("accuracy:x")


def test_a_reward_that_raises_counts_zero_and_is_reported(monkeypatch):
    def broken(completion, example):
        raise RuntimeError("boom")
    monkeypatch.setitem(R.REWARDS, "broken", broken)
    total, parts, errors = R.score("<think>x</think><answer>7</answer>", {"answer": "7"},
                                   R.parse_rewards("broken,format"))
    assert total == 1.0 and parts == {"broken": 0.0, "format": 1.0}
    assert errors == ["reward 'broken' raised RuntimeError: boom"]
    # a missing field is an error of the same kind, not a crash
    assert R.score("<answer>7</answer>", {}, R.parse_rewards("accuracy"))[2][0].startswith("reward 'accuracy' raised KeyError")
