"""data/smollm2_r1: the three-number sums and their cold start (disjoint splits, right
worked answers in R1's format), the trace check, and run.py end to end with --quick on the
tiny model given a chat template (the real model's run is measured, not tested:
docs/smollm2.md)."""

import json
import os
import subprocess
import sys

import pytest

import rewards as R
from conftest import data_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
prepare, run = data_script("smollm2_r1", "prepare"), data_script("smollm2_r1", "run")

def read(path):
    return [json.loads(line) for line in open(path)]


def factors(prompt):
    a, b = prompt.removeprefix("What is ").removesuffix("?").split(" * ")
    return int(a), int(b)


def test_prepare_writes_disjoint_splits_and_right_worked_answers(tmp_path):
    prepare.main(["--out", str(tmp_path), "--num-dev", "50", "--num-test", "60", "--num-cold-start", "40", "--seed", "3"])
    splits = {n: read(tmp_path / f"{n}.jsonl") for n in ["train", "dev", "test", "cold_start"]}
    assert {n: len(v) for n, v in splits.items()} == {"train": 720 - 110, "dev": 50, "test": 60, "cold_start": 40}
    questions = {n: [factors(r["prompt"]) for r in rows] for n, rows in splits.items()}
    every = questions["train"] + questions["dev"] + questions["test"]
    assert sorted(every) == [(a, b) for a in range(10, 100) for b in range(2, 10)]  # each product once
    assert questions["cold_start"] == questions["train"][:40]  # the cold start is training data
    for name, rows in splits.items():
        for r, (a, b) in zip(rows, questions[name]):
            assert r["answer"] == str(a * b) and ("completion" in r) == (name == "cold_start")
    for i, r in enumerate(splits["cold_start"]):  # terse and careful in turn
        (a, b), t, o = factors(r["prompt"]), factors(r["prompt"])[0] // 10 * 10, factors(r["prompt"])[0] % 10
        assert r["completion"] == [
            f"<think>\n{a} * {b} = {a * b}\n</think>\n<answer>{a * b}</answer>",
            f"<think>\nI split {a} into {t} and {o}.\n{t} * {b} = {t * b}\n{o} * {b} = {o * b}\n"
            f"{t * b} + {o * b} = {a * b}\n</think>\n<answer>{a * b}</answer>"][i % 2]
        # every worked answer earns both rewards, and its trace is right
        assert R.accuracy(r["completion"], r) == 1.0 and R.format_reward(r["completion"], r) == 1.0
        assert run.trace_right(r["completion"]) and bool(run.CAREFUL.match(r["completion"])) == (i % 2 == 1)
    again = tmp_path / "again"
    prepare.main(["--out", str(again), "--num-dev", "50", "--num-test", "60", "--num-cold-start", "40", "--seed", "3"])
    assert read(again / "test.jsonl") == splits["test"]  # seeded


def test_prepare_refuses_sizes_that_do_not_fit(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare.main(["--out", str(tmp_path), "--num-test", "400", "--num-cold-start", "300"])
    assert "leave 220 of the 720 questions for training" in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # nothing written


def test_value_parses_products_before_sums():
    assert run.value("59 + 63") == 122 and run.value("40 * 8 + 7 * 8") == 376
    assert run.value("10 - 3 - 2") == 5 and run.value("2 × 3 × 4 - 1") == 23 and run.value("7") == 7


@pytest.mark.parametrize("completion, right", [
    ("<think>\nFirst 59 + 63 = 122.\nThen 122 + 15 = 137.\n</think>\n<answer>137</answer>", True),
    ("<think>\nFirst 59 + 63 = 112.\nThen 112 + 15 = 127.\n</think>\n<answer>127</answer>", False),  # 1st wrong
    ("<think>\n59 + 63 + 15 = 122 + 15 = 137\n</think><answer>137</answer>", True),  # a chain
    ("<think>\n59 + 63 + 15 = 122 + 15 = 138\n</think><answer>137</answer>", False),  # its end wrong
    ("<think>\nI add them up in my head.\n</think>\n<answer>137</answer>", False),  # no step: no trace
    ("59 + 63 = 122. 122 + 15 = 137. The answer is 137.", False),  # no <think>: no trace
    ("<think>\n3 * 4 = 12\n</think> and 1 + 1 = 3 outside <answer>12</answer>", True),  # only <think> counts
])
def test_trace_right(completion, right):
    assert run.trace_right(completion) is right


@pytest.mark.slow
def test_quick_run_on_a_tiny_chat_model(tiny_chat_dir, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "data", "smollm2_r1", "run.py"), "--quick",
                           "--model", tiny_chat_dir, "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    card = json.load(open(out / "card.json"))
    assert list(card["stages"]) == ["shipped", "zero", "cold", "rl"]
    for name, report in card["stages"].items():  # each row is that evaluation's own report, plus the trace share
        assert {k: v for k, v in report.items() if k != "trace_right"} == json.load(
            open(out / "eval" / f"{name}.report.json"))
        assert report["prompts"] == 4 and report["samples"] == 8
        kept = read(out / "eval" / f"{name}.jsonl")
        assert (report["trace_right"] is None) == (not kept)
    for name in ["zero", "rl"]:  # both RL stages ran their 2 steps, the second from the cold start's checkpoint
        assert [r["step"] for r in card["curves"][name]] == [1, 2]
    rl_args = json.load(open(out / "rl" / "args.json"))
    assert rl_args["model"] == os.path.join(str(out), "cold", "step-000001")
    assert rl_args["beta"] == 0.04 and rl_args["lr"] == 1e-5
    assert json.load(open(out / "zero" / "args.json"))["model"] == tiny_chat_dir
    assert sorted(os.listdir(out / "logs")) == sorted(
        f"{n}.log" for n in ["data", "eval-shipped", "zero", "eval-zero", "cold", "eval-cold", "rl", "eval-rl"])
    md = open(out / "card.md").read()
    assert "quick smoke test" in md and md.count("\n| ") == 5  # the header and four stages
    assert done.stdout.strip().splitlines()[-1] == f"wrote {out}/card.md, {out}/card.json" + (
        f", {out}/card.png" if (out / "card.png").exists() else "")
