"""data/smollm2_r1: the products and their cold start (disjoint splits, right worked
answers in R1's format, in two styles), the trace check, and run.py end to end with
--quick on the tiny model given a chat template, and failing (the real model's run is
measured, not tested: docs/smollm2.md)."""

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
    ("<think>\nI split 47 into 40 and 7.\n40 * 8 = 320\n7 * 8 = 56\n320 + 56 = 376\n</think>", True),
    ("<think>\nI split 47 into 40 and 7.\n40 * 8 = 320\n7 * 8 = 54\n320 + 54 = 374\n</think>", False),  # 7 * 8
    ("<think>\n7 x 8 = 56, so 47 x 8 = 376.\n</think>", True),  # x for times; a full stop is no decimal
    ("<think>\n376 = 376\n</think>", False),  # no operation: not a worked step
    ("<think>\nstep2 = 2, 3.5 * 2 = 7, 1,000 + 1 = 1,001\n</think>", False),  # no whole-number step in it
    ("<think>\n" + "9" * 5000 + " + 1 = 2\n</think>", False),  # a number too long to read is not right
])
def test_trace_right(completion, right):
    assert run.trace_right(completion) is right


def test_shares_count_duplicates():
    careful = "<think>\nI split 47 into 40 and 7.\n40 * 8 = 320\n7 * 8 = 56\n320 + 56 = 376\n</think><answer>376</answer>"
    lucky = "<think>\nI split 47 into 40 and 7.\n40 * 8 = 330\n7 * 8 = 46\n330 + 46 = 376\n</think><answer>376</answer>"
    terse = "<think>\n47 * 8 = 376\n</think><answer>376</answer>"
    right = [{"completion": careful, "copies": 3}, {"completion": lucky, "copies": 1}, {"completion": terse, "copies": 2},
             {"completion": "It is 376.", "copies": 2}]
    assert run.shares(right) == (5 / 8, 4 / 8)  # right traces: 3 careful + 2 terse; careful: 3 + 1
    assert run.shares([{"completion": "It is 376.", "copies": 2}]) == (None, 0.0)  # no <think>: no trace
    assert run.shares([]) == (None, None)


@pytest.mark.slow
def test_quick_run_on_a_tiny_chat_model(tiny_chat_dir, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "data", "smollm2_r1", "run.py"), "--quick",
                           "--model", tiny_chat_dir, "--out", str(out), "--rl-flags", "--beta 0.02"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    card = json.load(open(out / "card.json"))
    assert list(card["stages"]) == ["shipped", "zero", "cold", "rl"]
    for name, report in card["stages"].items():  # each row is that evaluation's own report, plus two shares
        assert {k: v for k, v in report.items() if k not in ("trace_right", "careful")} == json.load(
            open(out / "eval" / f"{name}.report.json"))
        assert report["prompts"] == 4 and report["samples"] == 8
        kept = read(out / "eval" / f"{name}.jsonl")  # the right answers, whatever a random tiny model got
        assert (report["trace_right"], report["careful"]) == run.shares(kept)
        assert (report["careful"] is None) == (not kept)
    for name in ["zero", "rl"]:  # both RL stages ran their 2 steps, the second from the cold start's checkpoint
        assert [r["step"] for r in card["curves"][name]] == [1, 2]
    rl_args, zero_args = (json.load(open(out / name / "args.json")) for name in ["rl", "zero"])
    assert rl_args["model"] == os.path.join(str(out), "cold", "step-000001") and zero_args["model"] == tiny_chat_dir
    for a in (rl_args, zero_args):  # the same flags for both RL stages, --rl-flags added
        assert a["beta"] == 0.02 and a["lr"] == 1e-5 and a["warmup_steps"] == 5 and a["group"] == 8
    assert card["rl_args"][-2:] == ["--beta", "0.02"]
    assert list(card["seconds"]) == ["data", "eval-shipped", "zero", "eval-zero", "cold", "eval-cold", "rl", "eval-rl"]
    assert sorted(os.listdir(out / "logs")) == sorted(
        f"{n}.log" for n in ["data", "eval-shipped", "zero", "eval-zero", "cold", "eval-cold", "rl", "eval-rl"])
    md = open(out / "card.md").read()
    assert "quick smoke test" in md and md.count("\n| ") == 5  # the header and four stages
    assert done.stdout.strip().splitlines()[-1] == f"wrote {out}/card.md, {out}/card.json" + (
        f", {out}/card.png" if (out / "card.png").exists() else "")


@pytest.mark.slow
def test_a_failing_lane_fails_the_command_and_writes_no_card(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "data", "smollm2_r1", "run.py"), "--quick",
                           "--model", str(tmp_path / "no-such-model"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0
    assert "error: stage eval-shipped failed" in done.stdout and "error: stage cold failed" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == "error: 2 of the 2 lanes failed"
    assert not (out / "card.md").exists() and not (out / "card.json").exists()
