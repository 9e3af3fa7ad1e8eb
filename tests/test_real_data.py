r"""data/gsm8k/prepare.py and data/math/prepare.py on the real published files: GSM8K's official
train and test sets (7473 and 1319 questions) and MATH-500 (500 problems). The scripts run as
subprocesses, as a user runs them; then every gold solution of the data set, scored as a
completion by the accuracy reward a GRPO run uses, must earn 1 against the prepared answer.
The few that do not are listed below with the reason, so a new failure or a fixed one both
show up here.

The files sit beside the project in CI (../shared/real/); a test whose file is missing skips."""

import json
import os
import re
import subprocess
import sys

import pytest

import rewards as R
from nanor1 import common, grader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCURACY = R.parse_rewards("accuracy")

# gold solutions that do not score 1, by "file:line" (GSM8K) or unique_id (MATH-500) -> why;
# none at present (the two hardest, GSM8K train:7158 and MATH-500 number_theory/459, are in test_grader.py)
GSM8K_EXCEPTIONS = {}
MATH500_EXCEPTIONS = {}


def real(*parts):
    """The path of a published file under ../shared/real/, or a skip naming it."""
    path = os.path.join(ROOT, "..", "shared", "real", *parts)
    if not os.path.isfile(path):
        pytest.skip(f"{os.path.normpath(path)} is missing (tests/real/README.md says where it comes from)")
    return path


def read_raw(path):
    """[(line number, row)] of a jsonl file, blank lines skipped as the prepare scripts skip them."""
    with open(path, encoding="utf-8") as f:
        return [(n, json.loads(line)) for n, line in enumerate(f, 1) if line.strip()]


def prepare(name, out, *args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data", name, "prepare.py"), *args, "--out-dir", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def failures(ids, completions, examples):
    """{id: extracted answer} of the completions that do not score 1; no reward may raise."""
    scored = R.score_many(completions, examples, ACCURACY)
    assert [(i, errors) for i, (_, _, errors) in zip(ids, scored) if errors] == []
    return {i: grader.extract_answer(c) for i, c, (total, _, _) in zip(ids, completions, scored) if total != 1.0}


def r1(solution, answer):
    return f"<think>{solution}</think><answer>{answer}</answer>"


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    """{split: [(id, raw row, prepared record)]} of the official files through the script."""
    files = {split: real("gsm8k", f"{split}.jsonl") for split in ("train", "test")}
    out = tmp_path_factory.mktemp("gsm8k")
    stdout = prepare("gsm8k", out, "--train-file", files["train"], "--test-file", files["test"])
    assert "train.jsonl: 7473 questions" in stdout and "test.jsonl: 1319 questions" in stdout
    data = {}
    for split, path in files.items():
        raw = read_raw(path)
        records = common.read_jsonl(str(out / f"{split}.jsonl"), required=("prompt", "answer"))  # as grpo.py reads
        assert len(records) == len(raw)
        data[split] = [(f"{split}.jsonl:{n}", row, rec) for (n, row), rec in zip(raw, records)]
    return data


@pytest.fixture(scope="module")
def math500(tmp_path_factory):
    """[(unique_id, raw row, prepared record)] of MATH-500 given as the test file (and, since the
    script needs one, as the train file too)."""
    path = real("math500", "test.jsonl")
    out = tmp_path_factory.mktemp("math500")
    stdout = prepare("math", out, "--train-file", path, "--test-file", path)
    assert "test: 500 problems, 0 without a \\boxed answer (skipped), 0 outside --levels" in stdout
    assert "test.jsonl: 500 problems" in stdout
    raw = read_raw(path)
    records = common.read_jsonl(str(out / "test.jsonl"), required=("prompt", "answer"))
    assert len(records) == len(raw) == 500
    return [(row["unique_id"], row, rec) for (_, row), rec in zip(raw, records)]


def test_gsm8k_counts_and_answers(gsm8k):
    assert {split: len(items) for split, items in gsm8k.items()} == {"train": 7473, "test": 1319}
    for items in gsm8k.values():
        for where, row, rec in items:
            assert rec["prompt"] == row["question"].strip() and rec["prompt"], where
            assert re.fullmatch(r"-?\d+", rec["answer"]), (where, rec["answer"])  # all GSM8K answers are integers
            assert rec["lang"] == "en"
    answers = {where: rec["answer"] for items in gsm8k.values() for where, _, rec in items}
    # read by hand in the files: "#### 18" (the ducks), "#### 114,200", "#### -10", "#### -7"
    assert answers["test.jsonl:1"] == "18" and answers["test.jsonl:202"] == "114200"
    assert answers["test.jsonl:490"] == "-10" and answers["train.jsonl:5716"] == "-7"


def test_math500_counts_and_answers(math500):
    assert len(math500) == 500 and len({uid for uid, _, _ in math500}) == 500
    for uid, row, rec in math500:
        assert rec["prompt"] == row["problem"].strip() and rec["prompt"], uid
        assert rec["answer"] == row["answer"], uid  # the last \boxed{} is MATH-500's own answer, every time
        assert (rec["level"], rec["subject"]) == (row["level"], row["subject"]), uid
    first = math500[0][2]
    assert (first["answer"], first["level"], first["subject"]) == (r"\left( 3, \frac{\pi}{2} \right)", 2, "Precalculus")
    assert {uid: rec["answer"] for uid, _, rec in math500}["test/algebra/1349.json"] == r"\text{Evelyn}"


@pytest.mark.parametrize("split", ["test", "train"])
def test_gsm8k_gold_solutions_score_1(gsm8k, split):
    """The published solution, <<...>> calculator notes and "#### n" line included, is a correct
    completion; so is it as R1's <think> with the prepared answer in <answer>."""
    ids, rows, records = zip(*gsm8k[split])
    solutions = [row["answer"] for row in rows]
    failed = failures(ids, solutions, records)
    expected = {k: v for k, v in GSM8K_EXCEPTIONS.items() if k.startswith(f"{split}.jsonl:")}
    assert set(failed) == set(expected), failed
    assert failures(ids, [r1(s, rec["answer"]) for s, rec in zip(solutions, records)], records) == {}


def test_math500_gold_solutions_score_1(math500):
    r"""The published solution, with its \boxed{} answer, is a correct completion; so is it as R1's
    <think> with the prepared answer in <answer>."""
    ids, rows, records = zip(*math500)
    solutions = [row["solution"] for row in rows]
    failed = failures(ids, solutions, records)
    assert set(failed) == set(MATH500_EXCEPTIONS), failed
    assert failures(ids, [r1(s, rec["answer"]) for s, rec in zip(solutions, records)], records) == {}
