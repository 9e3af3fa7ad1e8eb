"""data/smollm2: the two-digit additions (disjoint, counted splits with right answers) and
run.py end to end with --quick, on the tiny model given a chat template (the real model's
own run is measured, not tested: docs/smollm2.md)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import data_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
prepare, run = data_script("smollm2", "prepare"), data_script("smollm2", "run")


def read(path):
    return [json.loads(line) for line in open(path)]


def test_prepare_writes_disjoint_counted_splits_with_right_answers(tmp_path):
    prepare.main(["--out", str(tmp_path), "--num-train", "300", "--num-dev", "20", "--num-test", "30", "--seed", "3"])
    splits = {name: read(tmp_path / f"{name}.jsonl") for name in ["train", "dev", "test"]}
    assert {k: len(v) for k, v in splits.items()} == {"train": 300, "dev": 20, "test": 30}
    seen = set()
    for rows in splits.values():
        for r in rows:
            a, b = (int(x) for x in r["prompt"].removeprefix("What is ").removesuffix("?").split(" + "))
            assert 10 <= a <= 99 and 10 <= b <= 99 and r["answer"] == str(a + b)
            assert (min(a, b), max(a, b)) not in seen  # a + b and b + a are one question
            seen.add((min(a, b), max(a, b)))
    again = tmp_path / "again"
    prepare.main(["--out", str(again), "--num-train", "300", "--num-dev", "20", "--num-test", "30", "--seed", "3"])
    assert read(again / "test.jsonl") == splits["test"]  # seeded


def test_prepare_refuses_more_questions_than_there_are(tmp_path):
    with pytest.raises(SystemExit, match="only 4095 distinct sums"):
        prepare.main(["--out", str(tmp_path), "--num-train", "4096"])


@pytest.mark.slow
def test_quick_run_on_a_tiny_chat_model(tiny_chat_dir, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "data", "smollm2", "run.py"), "--quick",
                           "--model", tiny_chat_dir, "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    card = json.load(open(out / "card.json"))
    assert card["steps"] == 2 and card["gain"] == pytest.approx(card["after"]["pass@1"] - card["before"]["pass@1"])
    for name in ["before", "after"]:  # each row is that evaluation's own report
        assert card[name] == json.load(open(out / "eval" / f"{name}.report.json"))
        assert card[name]["prompts"] == 4 and card[name]["samples"] == 8
    md = open(out / "card.md").read()
    probes = [json.load(open(out / "eval" / f"probe-{name}.json")) for name in ["before", "after"]]
    assert card["probe"] == {"before": probes[0]["right"], "after": probes[1]["right"]}
    assert all(p["questions"] == 4 and p["right"] in (0, 0.25, 0.5, 0.75, 1) for p in probes)
    assert "quick smoke test" in md and md.count("- step ") == 8  # 4 samples at the first and the last step
    assert [r["step"] for r in run.curves(out / "grpo")] == [1, 2]
    # the evaluations write their reports and nothing else (no empty sample files), and no log
    # points to training on samples that were never kept
    assert sorted(os.listdir(out / "eval")) == ["after.report.json", "before.report.json",
                                                "probe-after.json", "probe-before.json"]
    assert not any("sft.py" in open(out / "logs" / f).read() for f in os.listdir(out / "logs"))
    assert done.stdout.strip().splitlines()[-1] == f"wrote {out}/card.md, {out}/card.json" + (
        f", {out}/card.png" if (out / "card.png").exists() else "")
