"""Rule rewards: the format, language and length rules, accuracy from the example's answer,
and their composition by name and weight (the grader behind accuracy is test_grader.py's)."""

import pytest

import rewards as R


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
    ("<think>a</think>between<answer>b</answer>", 0.0),
])
def test_format_reward(completion, want):
    assert R.format_reward(completion, {}) == want


@pytest.mark.parametrize("completion, want", [
    ("<think>a</think><answer>b</answer>", 1.0), ("<think>a</think>", 0.5), ("<think>a", 0.25),
    ("<think>a</think><think>b</think><answer>c</answer>", 0.5), ("no tags", 0.0),
])
def test_format_tags_gives_partial_credit(completion, want):
    assert R.format_tags(completion, {}) == want


@pytest.mark.parametrize("think, lang, want", [
    ("we add the two numbers and get seven", "en", 1.0),
    ("we add 两个 numbers", "en", 3 / 5),                                    # 3 English words, 2 Han characters
    ("我们把两个数相加", "zh", 1.0),
    ("我们 add them", "zh", 2 / 4),
    ("so $x + y = \\frac{a}{b}$ and x is even", "en", 1.0),                  # math, LaTeX and variables are not words
    ("Считаем: two plus two", "ru", 1 / 4),
    ("12 + 30 = 42", "en", 0.0),                                            # no words at all
])
def test_language_share_of_words_in_the_target_script(think, lang, want):
    got = R.language(f"<think>{think}</think><answer>1</answer>", {"lang": lang})
    assert got == pytest.approx(want)


def test_language_defaults_to_english_and_rejects_unknown():
    assert R.language("<think>hello there</think>", {}) == 1.0
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        R.language("<think>hello</think>", {"lang": "xx"})


@pytest.mark.parametrize("n, want", [(0, 0.0), (60, 0.0), (61, -0.05), (70, -0.5), (80, -1.0), (95, -1.0)])
def test_overlong_penalty_is_dapo_soft_ramp(n, want):
    # limit 80, buffer 20: free up to 60 tokens, then -1/20 per token down to -1 at 80
    assert R.overlong("x", {"num_tokens": n, "max_tokens": 80, "overlong_buffer": 20}) == pytest.approx(want)


def test_cosine_length_reward():
    ex = {"answer": "4", "max_tokens": 100}
    right, wrong = "<think>..</think><answer>4</answer>", "<think>..</think><answer>5</answer>"
    assert R.cosine(right, {**ex, "num_tokens": 0}) == pytest.approx(1.0)
    assert R.cosine(right, {**ex, "num_tokens": 50}) == pytest.approx(0.75)   # cos(pi/2) = 0: halfway
    assert R.cosine(right, {**ex, "num_tokens": 100}) == pytest.approx(0.5)
    assert R.cosine(wrong, {**ex, "num_tokens": 0}) == pytest.approx(-1.0)
    assert R.cosine(wrong, {**ex, "num_tokens": 100}) == pytest.approx(-0.5)


def test_accuracy_reward_uses_the_example_answer():
    assert R.accuracy("<think>3+4</think><answer>7</answer>", {"answer": "7"}) == 1.0
    assert R.accuracy("<think>3+4 = 7</think><answer>8</answer>", {"answer": "7"}) == 0.0
    assert R.accuracy("<think>half</think><answer>\\frac{1}{2}</answer>", {"answer": 0.5}) == 1.0  # numbers in jsonl


def test_parse_rewards_and_weighted_score():
    spec = R.parse_rewards("accuracy, format:0.5")
    assert [(n, w) for n, _, w in spec] == [("accuracy", 1.0), ("format", 0.5)]
    total, parts, errors = R.score("<think>x</think><answer>7</answer>", {"answer": "7"}, spec)
    assert (total, parts, errors) == (1.5, {"accuracy": 1.0, "format": 1.0}, [])
    with pytest.raises(ValueError, match="unknown reward 'acc'"):
        R.parse_rewards("acc")
    with pytest.raises(ValueError, match="not a number"):
        R.parse_rewards("accuracy:x")
    with pytest.raises(ValueError, match="not finite"):
        R.parse_rewards("accuracy:nan")
    with pytest.raises(ValueError, match="named twice"):
        R.parse_rewards("format,format:2")


def test_a_reward_that_raises_counts_zero_and_is_reported(monkeypatch):
    def broken(completion, example):
        raise RuntimeError("boom")
    monkeypatch.setitem(R.REWARDS, "broken", broken)
    monkeypatch.setitem(R.REWARDS, "nan", lambda c, ex: float("nan"))
    total, parts, errors = R.score("<think>x</think><answer>7</answer>", {"answer": "7"},
                                   R.parse_rewards("broken,format,nan"))
    assert total == 1.0 and parts == {"broken": 0.0, "format": 1.0, "nan": 0.0}
    assert errors == ["reward 'broken' raised RuntimeError: boom", "reward 'nan' raised ValueError: returned nan"]
    # a missing field is an error of the same kind, not a crash
    assert R.score("<answer>7</answer>", {}, R.parse_rewards("accuracy"))[2][0].startswith("reward 'accuracy' raised KeyError")


def test_score_many_matches_score_one_by_one():
    spec = R.parse_rewards("accuracy,format:0.5,format_tags:0.25")
    texts = ["<think>a</think><answer>7</answer>", "<answer>7</answer>", "<think>b</think><answer>8</answer>", "7"]
    examples = [{"answer": "7"}] * len(texts)
    assert R.score_many(texts, examples, spec) == [R.score(t, e, spec) for t, e in zip(texts, examples)]
