"""ablate.py: the statistics by hand, the flags' syntax, and the harness: on a stand-in training
script (finished runs skipped, stopped ones resumed, a failing one reported), then on grpo.py."""

import json
import math
import os
import sys

import pytest

import ablate

# ------------------------------------------------------------------------- the statistics, by hand


def test_t_interval_by_hand():
    got = ablate.t_interval([0.5, 0.7, 0.6, 0.8, 0.4])
    # mean 0.6; sd sqrt((0.01 + 0.01 + 0 + 0.04 + 0.04) / 4) = sqrt(0.025) = 0.158114;
    # half width t(0.975, 4) = 2.776 x 0.158114 / sqrt(5) = 0.196293
    assert got["mean"] == pytest.approx(0.6) and got["sd"] == pytest.approx(0.158114, abs=1e-6)
    assert (got["lo"], got["hi"]) == (pytest.approx(0.6 - 0.196293, abs=1e-6), pytest.approx(0.6 + 0.196293, abs=1e-6))
    one = ablate.t_interval([0.3])
    assert one["mean"] == 0.3 and one["sd"] is None and one["lo"] is None  # one seed: no interval
    assert ablate.verdict(one) == "one seed: no interval"


def test_the_t_table_against_known_quantiles():
    # t(0.975) for 1, 2, 4, 9 and 29 degrees of freedom (any statistics table)
    assert [ablate.T975[d - 1] for d in (1, 2, 4, 9, 29)] == [12.706, 4.303, 2.776, 2.262, 2.045]
    assert all(a > b for a, b in zip(ablate.T975, ablate.T975[1:]))  # falling towards the normal's 1.96


def test_the_paired_difference_cancels_the_seeds_shared_luck():
    # each seed moves both variants alike; the second is 0.05 better on every seed
    a = [0.40, 0.70, 0.55]
    b = [0.45, 0.75, 0.60]
    paired = ablate.t_interval([y - x for x, y in zip(a, b)])
    assert paired["mean"] == pytest.approx(0.05) and paired["sd"] == pytest.approx(0.0, abs=1e-12)
    assert ablate.verdict(paired) == "higher"
    # unpaired, the two intervals overlap: the seeds' spread hides the effect
    ia, ib = ablate.t_interval(a), ablate.t_interval(b)
    assert ia["hi"] > ib["lo"]
    noisy = ablate.t_interval([0.05, -0.04, 0.02])  # mean 0.01, sd 0.0458: the interval holds 0
    assert ablate.verdict(noisy) == "unseparated"
    assert ablate.verdict(ablate.t_interval([-0.1, -0.12, -0.08])) == "lower"


def test_area_under_the_curve_by_trapezoids():
    # steps 0, 10, 30: areas 10 x (0.2 + 0.4) / 2 = 3 and 20 x (0.4 + 0.6) / 2 = 10; / 30 steps
    assert ablate.auc([(0, 0.2), (10, 0.4), (30, 0.6)]) == pytest.approx(13 / 30)
    assert ablate.auc([(5, 0.7)]) == 0.7


@pytest.mark.parametrize("text, seeds", [("0-2", [0, 1, 2]), ("0,3,7", [0, 3, 7]), ("0-1,9", [0, 1, 9]), ("4", [4])])
def test_seeds_syntax(text, seeds):
    assert ablate.parse_seeds(text) == seeds


@pytest.mark.parametrize("argv, named", [
    (["--seeds", "2-0"], "--seeds"),
    (["--seeds", "a"], "--seeds"),
    (["--seeds", "0,0"], "--seeds"),
    (["--variant", "noequals"], "--variant"),
    (["--variant", "bad name=--lr 1"], "--variant"),
    (["--variant", "x=@notpython --lr 1"], "--variant"),
    (["--variant", "x=--seed 3"], "--variant x"),
    (["--variant", "a=", "--variant", "a=--lr 1"], "--variant a"),
    (["--variant", "x='unclosed"], "--variant"),
    (["--base", "grpo.py --out here"], "--base"),
    (["--parallel", "0"], "--parallel"),
])
def test_bad_syntax_is_one_error(capsys, argv, named):
    base = [] if "--base" in argv else ["--base", "grpo.py --model m --data d"]
    variant = [] if "--variant" in argv else ["--variant", "grpo="]
    with pytest.raises(SystemExit) as e:
        ablate.get_args([*base, *variant, *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err


def test_a_variant_adds_flags_or_swaps_the_script():
    v = ablate.parse_variants(["grpo=", "dr=--scale none --agg seq-sum", "ppo=@ppo.py --group 1"],
                              "grpo.py --model m --group 8")
    assert v == {"grpo": ["grpo.py", "--model", "m", "--group", "8"],
                 "dr": ["grpo.py", "--model", "m", "--group", "8", "--scale", "none", "--agg", "seq-sum"],
                 "ppo": ["ppo.py", "--model", "m", "--group", "8", "--group", "1"]}  # the later --group wins

# ------------------------------------------------------------------------- the harness, on a stand-in script

FAKE = r'''
import json, os, signal, sys, time
argv = sys.argv[1:]
asked = []
signal.signal(signal.SIGTERM, lambda *a: asked.append(1))  # as grpo.py: stop at the step's end
get = lambda flag, default=None: argv[argv.index(flag) + 1] if flag in argv else default
out, seed, lr = get("--out"), int(get("--seed")), float(get("--lr", "0"))
open(out + ".threads", "w").write(os.environ.get("OMP_NUM_THREADS", "unset"))
if get("--fail"):
    sys.exit("error: --fail: this variant always fails")
steps = int(get("--steps", "4"))
start = 0
if "--resume" in argv:
    start = max(int(d[5:]) for d in os.listdir(out) if d.startswith("step-"))
    open(os.path.join(out, "resumed"), "a").write(f"{start}\n")
else:
    os.makedirs(out, exist_ok=True)
    eval_data = os.path.join(os.path.dirname(out), "eval.jsonl")  # 60 prompts, 50 of them evaluated
    open(eval_data, "w").write("{}\n" * 60)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"args": {"eval_prompts": 50, "eval_samples": 2, "eval_data": eval_data}}) + "\n")
for step in range(start + 1, steps + 1):
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "reward": 1.0, "len": 10.0 * step + seed, "entropy": 0.5 - 0.1 * seed,
                            "s": 1.0 + step, "sample_s": 0.5, "update_s": 0.5 + step}) + "\n")
        if step % 2 == 0:
            f.write(json.dumps({"step": step, "eval_pass@1": min(0.9, round(0.1 * step + 0.01 * seed + lr, 4))}) + "\n")
            with open(os.path.join(out, "samples.jsonl"), "a") as s:  # a right and a wrong completion
                for right, n in [(1.0, 10 * step), (0.0, 5 * step)]:
                    s.write(json.dumps({"step": step, "parts": {"accuracy": right}, "num_tokens": n}) + "\n")
    os.makedirs(os.path.join(out, f"step-{step:06d}"), exist_ok=True)
    open(os.path.join(out, f"step-{step:06d}", "trainer_state.pt"), "w").write("x")
    if get("--stop-at") and step == int(get("--stop-at")) and "--resume" not in argv:
        sys.exit(130)  # as a signal stops grpo.py: at a step's end, after its checkpoint
    time.sleep(float(get("--step-seconds", "0")))
    if asked and step < steps:
        sys.exit(130)
'''


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE)
    return str(path)


def test_the_table_is_the_runs_numbers_by_hand(fake, tmp_path):
    out = tmp_path / "ab"
    table = ablate.main(["--base", f"{fake} --steps 4", "--variant", "a=", "--variant", "b=--lr 0.05",
                         "--seeds", "0-1", "--parallel", "2", "--out", str(out)])
    # seed s of variant a: pass@1 0.2 + 0.01 s at step 2, 0.4 + 0.01 s at step 4; b adds 0.05
    a, b = table["a"], table["b"]
    assert a["final"]["mean"] == pytest.approx(0.405) and a["final"]["sd"] == pytest.approx(math.sqrt(0.00005))
    assert b["final"]["mean"] == pytest.approx(0.455)
    assert a["auc"]["mean"] == pytest.approx(0.305)  # (0.2 + 0.4) / 2 + 0.005
    d = b["paired"]["final"]
    assert d["mean"] == pytest.approx(0.05) and d["sd"] == pytest.approx(0, abs=1e-9)
    assert "paired" not in a
    assert a["len"] == pytest.approx(40.5)  # the last quarter of 4 steps: step 4, len 40 + seed
    assert a["entropy"] == pytest.approx(0.45)
    assert (a["len_right"], a["len_wrong"]) == (40, 20)  # the samples of step 4, the second half of 4 steps
    assert a["s"] == pytest.approx(3.5) and a["phases"] == {"sample_s": 0.5, "update_s": pytest.approx(3.0)}
    assert a["eval_noise"] == pytest.approx((math.sqrt(0.4 * 0.6 / 100) + math.sqrt(0.41 * 0.59 / 100)) / 2)
    assert a["peak_mib"] > 0
    # two runs at a time share the cores out: one thread each on two
    assert open(out / "a" / "seed-0.threads").read() == str(max(1, os.cpu_count() // 2))
    saved = json.load(open(out / "ablation.json"))
    assert saved["table"]["b"]["final"]["mean"] == pytest.approx(0.455)
    md = open(out / "ablation.md").read()
    assert "| b | 2 | 0.455 ± 0.007" in md and "+0.050" in md


def test_a_rerun_skips_finished_runs_and_resumes_a_stopped_one(fake, tmp_path, capsys):
    out = tmp_path / "ab"
    argv = ["--base", f"{fake} --steps 4", "--variant", "a=", "--seeds", "0-1", "--out", str(out)]
    ablate.main(argv)
    # seed 1 stops after its step 2 (a crash after a checkpoint): its done marker goes
    os.remove(out / "a" / "seed-1.done.json")
    for d in ["step-000003", "step-000004"]:
        __import__("shutil").rmtree(out / "a" / "seed-1" / d)
    capsys.readouterr()
    table = ablate.main(argv)
    printed = capsys.readouterr().out
    assert "[a seed 0]" not in printed  # finished: skipped
    assert "[a seed 1] resume" in printed and "--resume" in printed
    assert open(out / "a" / "seed-1" / "resumed").read() == "2\n"
    assert table["a"]["final"]["mean"] == pytest.approx(0.405)


def test_a_run_stopped_by_a_signal_stops_the_harness_and_resumes_on_the_rerun(fake, tmp_path, capsys):
    out = tmp_path / "ab"
    argv = ["--base", f"{fake} --steps 4 --stop-at 2", "--variant", "a=", "--seeds", "0-1", "--out", str(out)]
    with pytest.raises(SystemExit, match="stopped: run the same command again"):
        ablate.main(argv)
    assert "[a seed 1]" not in capsys.readouterr().out  # nothing more was started
    with pytest.raises(SystemExit):  # seed 0 resumes and finishes; seed 1 starts, and stops as seed 0 did
        ablate.main(argv)
    table = ablate.main(argv)
    assert open(out / "a" / "seed-0" / "resumed").read() == open(out / "a" / "seed-1" / "resumed").read() == "2\n"
    assert table["a"]["seeds"] == [0, 1] and table["a"]["final"]["mean"] == pytest.approx(0.405)


def test_a_sigterm_to_the_harness_stops_the_runs_at_a_checkpoint(fake, tmp_path):
    import subprocess
    import time

    out = tmp_path / "ab"
    cmd = [sys.executable, ablate.__file__, "--base", f"{fake} --steps 40 --step-seconds 0.2", "--variant", "a=",
           "--seeds", "0-1", "--parallel", "2", "--out", str(out)]
    harness = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (out / "a" / "seed-1" / "step-000002").exists():
        time.sleep(0.05)
    harness.send_signal(__import__("signal").SIGTERM)
    printed, _ = harness.communicate(timeout=60)
    assert harness.returncode == 1 and "stopped: run the same command again" in printed
    assert printed.count("stopped; the same command goes on with it") == 2  # both runs had it passed on
    assert not (out / "a" / "seed-0" / "step-000040").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.count("resume:") == 2


def test_a_changed_command_starts_over(fake, tmp_path, capsys):
    out = tmp_path / "ab"
    ablate.main(["--base", f"{fake} --steps 2", "--variant", "a=", "--seeds", "0", "--out", str(out)])
    capsys.readouterr()
    table = ablate.main(["--base", f"{fake} --steps 4", "--variant", "a=", "--seeds", "0", "--out", str(out)])
    assert "[a seed 0] start" in capsys.readouterr().out
    assert table["a"]["final"]["mean"] == pytest.approx(0.4)


def test_a_failing_variant_is_reported_and_the_others_finish(fake, tmp_path, capsys):
    out = tmp_path / "ab"
    with pytest.raises(SystemExit) as e:
        ablate.main(["--base", f"{fake} --steps 2", "--variant", "ok=", "--variant", "bad=--fail 1",
                     "--seeds", "0-1", "--parallel", "2", "--out", str(out)])
    assert e.value.code == 1
    printed = capsys.readouterr().out
    assert printed.count("FAILED (exit 1): error: --fail: this variant always fails") == 2
    assert "FAILED: bad seed 0: error: --fail" in open(out / "ablation.md").read()
    table = json.load(open(out / "ablation.json"))["table"]
    assert table["ok"]["seeds"] == [0, 1] and table["bad"]["seeds"] == []

# ------------------------------------------------------------------------- on the tiny model


@pytest.mark.slow
def test_two_variants_of_grpo_over_two_seeds(tiny_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n")
    out = tmp_path / "ab"
    base = (f"grpo.py --model {tiny_dir} --data {data} --eval-data {data} --eval-every 1 --eval-prompts 4 "
            "--eval-samples 2 --num-steps 1 --group 4 --prompts-per-step 2 --max-new-tokens 6 --device cpu "
            "--rewards format --lr 1e-2 --sample-every 0")
    table = ablate.main(["--base", base, "--variant", "grpo=", "--variant", "dr=--scale none --agg seq-sum",
                         "--seeds", "0-1", "--parallel", "2", "--out", str(out)])
    finals_of = {}
    for name in ["grpo", "dr"]:
        finals, lens = [], []
        for seed in [0, 1]:
            lines = [json.loads(l) for l in open(out / name / f"seed-{seed}" / "metrics.jsonl")]
            assert lines[0]["args"]["seed"] == seed
            finals.append([r["eval_pass@1"] for r in lines if "eval_pass@1" in r][-1])
            lens.append([r["len"] for r in lines if "reward" in r][-1])  # one step
        assert table[name]["final"]["mean"] == pytest.approx(sum(finals) / 2)
        assert table[name]["len"] == pytest.approx(sum(lens) / 2)
        finals_of[name] = finals
    diffs = [d - g for d, g in zip(finals_of["dr"], finals_of["grpo"])]
    assert table["dr"]["paired"]["final"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert table["dr"]["paired"]["final"]["sd"] == pytest.approx(abs(diffs[0] - diffs[1]) / math.sqrt(2))
