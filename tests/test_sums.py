"""The miniature pipeline: the sums task's data (data/sums/prepare.py), the one command
that runs every stage of the recipe on it (data/sums/pipeline.py), and the split of a
checkpoint's answers by style (data/sums/styles.py)."""

import json
import os
import re
import subprocess
import sys

import pytest

import rewards as R
from conftest import data_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


prep, pipe = data_script("sums", "prepare"), data_script("sums", "pipeline")


def prepare(out, *flags):
    cmd = [sys.executable, os.path.join(ROOT, "data", "sums", "prepare.py"), "--out-dir", str(out), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def records(path):
    return [json.loads(line) for line in open(path)]


# ----------------------------------------------------------------------------------------
# the task


def test_trace_worked_by_hand():
    # 57 + 8 * 5 = 97: from 7, add 8 five times keeping the last digit: 5, 3, 1, 9, 7
    assert prep.question((57, 8, 5)) == "What is the last digit of 57 + 8 * 5?"
    assert prep.drill((57, 8, 5)) == "57 + 8 * 5: 7+8=15 (4), 5+8=13 (3), 3+8=11 (2), 1+8=09 (1), 9+8=17 (0), 7."
    assert prep.trace((57, 8, 5)) == ("<think>57 + 8 * 5: 7+8=15 (4), 5+8=13 (3), 3+8=11 (2), 1+8=09 (1), "
                                      "9+8=17 (0), 7.</think> <answer>7</answer>")
    assert prep.answer((57, 8, 5)) == "7"
    assert prep.trace((3, 2, 1)) == "<think>3 + 2 * 1: 3+2=05 (0), 5.</think> <answer>5</answer>"
    assert prep.terse((57, 8, 5)) == "<think>57 + 8 * 5 ends in 7.</think> <answer>7</answer>"


def test_the_longest_trace_fits_the_pipelines_token_limit():
    from nanor1 import models

    tok = models.build_tiny_tokenizer()  # the tokenizer of every model the pipeline builds
    longest = max(len(tok(prep.trace((n, d, 7)))["input_ids"]) for n in (9, 99) for d in range(2, 10))
    assert longest == 102 and longest + 1 <= pipe.MAX_NEW_TOKENS  # + 1: the end token


def check_steps(text, n, d, k):
    """The stepwise working of n + d * k in text is right: one addition per step, counted
    down to 0, and the digit after the last step is the answer; it starts with the sum."""
    assert text.removeprefix("<think>").startswith(f"{n} + {d} * {k}: ")
    steps = re.findall(r"(\d)\+(\d)=(\d\d) \((\d)\)", text)
    assert len(steps) == k
    x = n % 10
    for i, (a, b, total, left) in enumerate(steps):
        assert (int(a), int(b), int(total), int(left)) == (x, d, x + d, k - 1 - i)
        x = (x + d) % 10
    assert text.endswith(f", {x}.</think> <answer>{x}</answer>") or text.endswith(f", {x}.")


def parse(prompt):
    return map(int, re.fullmatch(r"What is the last digit of (\d+) \+ (\d) \* (\d)\?", prompt).groups())


def test_expert_traces_are_correct_half_of_them_terse(tmp_path):
    prepare(tmp_path, "--num-pretrain", "10")
    terse = 0
    for r in records(tmp_path / "cold_start.jsonl"):
        n, d, k = parse(r["prompt"])
        assert r["answer"] == str((n + d * k) % 10)
        if "ends in" in r["completion"]:
            terse += 1
            x = r["answer"]
            assert r["completion"] == f"<think>{n} + {d} * {k} ends in {x}.</think> <answer>{x}</answer>"
        else:
            check_steps(r["completion"], n, d, k)
        # the rewards the RL stages use agree with the expert, in both styles
        assert R.format_reward(r["completion"], r) == 1.0
        assert R.accuracy(r["completion"], r) == 1.0
    assert terse == 150


def test_splits_are_seeded_disjoint_and_counted(tmp_path):
    out = prepare(tmp_path / "a", "--num-pretrain", "500")
    prepare(tmp_path / "b", "--num-pretrain", "500")
    names = ["train", "test", "fresh", "cold_start", "mid", "pretrain"]
    for name in names:
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    assert "test.jsonl: 200 examples" in out and "pretrain.jsonl: 500 documents" in out
    prompts = {name: [r["prompt"] for r in records(tmp_path / "a" / f"{name}.jsonl")] for name in names[:5]}
    assert [len(prompts[n]) for n in names[:5]] == [2000, 200, 1000, 300, 2000]
    for i, a in enumerate(names[:5]):
        assert len(set(prompts[a])) == len(prompts[a])
        for b in names[i + 1:5]:
            assert not set(prompts[a]) & set(prompts[b]), (a, b)
    other = prepare(tmp_path / "c", "--num-pretrain", "500", "--seed", "1")
    assert other and (tmp_path / "c" / "test.jsonl").read_bytes() != (tmp_path / "a" / "test.jsonl").read_bytes()


def test_pretraining_has_the_procedure_but_no_question_and_no_held_out_sum(tmp_path):
    prepare(tmp_path, "--num-pretrain", "4000")
    docs = [r["text"] for r in records(tmp_path / "pretrain.jsonl")]
    held_out = {tuple(parse(r["prompt"])) for r in records(tmp_path / "test.jsonl")}
    assert not any("?" in d or "<" in d for d in docs)  # no question, no tag
    drills = [d for d in docs if d.startswith("Work out ")]
    assert 0.4 < len(drills) / len(docs) < 0.6
    for d in drills:
        n, d_, k = map(int, re.match(r"Work out (\d+) \+ (\d) \* (\d)\. ", d).groups())
        check_steps(d.split(". ", 1)[1], n, d_, k)  # the heading, then the drill of the same sum
        assert (n, d_, k) not in held_out
    others = [d for d in docs if d not in drills]
    assert all(re.fullmatch(r"The last digit of (\d+) is \d\.", d) or re.fullmatch(r"(\(\d\), )+\(0\)\.", d)
               for d in others)


def test_mid_training_answers_half_worked_out(tmp_path):
    prepare(tmp_path, "--num-pretrain", "10")
    mid = records(tmp_path / "mid.jsonl")
    worked = 0
    for r in mid:
        n, d, k = parse(r["prompt"])
        x = (n + d * k) % 10
        if "(0)" in r["completion"]:
            worked += 1
            check_steps(r["completion"], n, d, k)
        else:  # in one go, and right
            assert re.fullmatch(rf"(<think>{k} times {d}\.</think>)? (<answer>{x}</answer>|{x}\.)", r["completion"])
    assert 0.45 < worked / len(mid) < 0.55


def test_prepare_refuses_bad_sizes(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "data", "sums", "prepare.py"), "--out-dir", str(tmp_path)]
    bad = subprocess.run(cmd + ["--min-times", "5", "--max-times", "3"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--min-times" in bad.stderr
    few = subprocess.run(cmd + ["--max-times", "1", "--num-train", "5000"], capture_output=True, text=True)
    assert few.returncode != 0 and "distinct questions" in few.stderr and not os.listdir(tmp_path)
    for flags, flag in [(["--max-times", "10"], "--max-times"), (["--num-test", "-5"], "--num-test"),
                        (["--num-mid", "-1"], "--num-mid"), (["--terse", "1.5"], "--terse"),
                        (["--mid-worked", "-0.1"], "--mid-worked")]:
        bad = subprocess.run(cmd + flags, capture_output=True, text=True)
        assert bad.returncode != 0 and flag in bad.stderr and not os.listdir(tmp_path)


def test_styles_by_hand():
    sty = data_script("sums", "styles")
    q = "What is the last digit of 57 + 8 * 5?"
    worked, slipped = prep.trace((57, 8, 5)), "<think>57 + 8 * 5: 5+8=13 (4), 3.</think> <answer>3</answer>"
    terse, at_once = prep.terse((57, 8, 5)), " 7."
    assert [sty.style(c) for c in (worked, slipped, terse, at_once, "<think>")] == [
        "worked", "worked", "terse", "at once", "terse"]
    assert sty.starts_right(q, worked) and not sty.starts_right(q, slipped)  # 5 is the tens digit
    assert not sty.starts_right(q, "<think>57 + 8 * 5: 7+9=16 (4), 6.</think>")  # the wrong step
    shares = sty.tally([(q, worked, True), (q, slipped, False), (q, terse, True), (q, at_once, False)])
    assert shares == {"worked": (0.5, 0.5, 0.5), "terse": (0.25, 1.0, None), "at once": (0.25, 0.0, None)}
    assert sty.MAX_NEW_TOKENS == pipe.MAX_NEW_TOKENS  # the limit the pipeline's models were trained under


def test_styles_names_a_bad_data_line_a_missing_model_and_a_bad_flag(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "What is the last digit of 5 + 2 * 3?", "answer": "1"}\n'
                    '{"prompt": "What is 2 + 2?", "answer": "4"}\n')
    cmd = [sys.executable, os.path.join(ROOT, "data", "sums", "styles.py"), "--data", str(data)]
    for flags, message in [(["--model", "nowhere"], f"{data}:2: not a question of the sums task"),
                           (["--model", str(tmp_path / "nowhere"), "--max-prompts", "1"], "nowhere"),
                           (["--model", "m", "--num-samples", "0"], "--num-samples must be at least 1"),
                           (["--model", "m", "--top-p", "0"], "--top-p must be above 0")]:
        bad = subprocess.run(cmd + flags, capture_output=True, text=True)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------------------
# the pipeline's pieces


def test_last_checkpoint_is_the_highest_step(tmp_path):
    for name in ["step-000009", "step-000120", "step-000010", ".tmp-step-000200", "args.json"]:
        (tmp_path / name).mkdir()
    assert pipe.last_checkpoint(str(tmp_path)) == str(tmp_path / "step-000120")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        pipe.last_checkpoint(str(empty))
    with pytest.raises(SystemExit, match="holds no checkpoint; run again with --fresh"):
        pipe.last_checkpoint(str(tmp_path / "missing"))


def test_card_lines():
    rows = [{"stage": "1 base", "model": "base/step-000010", "seconds": 12.4, "pass@1": 0.1, "format": 0.0125,
             "len": 6.66},
            {"stage": "5 rejection sampling", "model": "kept.jsonl: 3 of 8 samples", "seconds": 2.6}]
    curves = {"zero": {"eval": [[0, 0.1], [10, 0.25]], "len": [[1, 4.0], [2, 6.5], [3, 9.0], [4, 12.0], [5, 30.2]]}}
    full = pipe.card_lines(rows, curves, 90)
    assert full == [
        "| stage | model | held-out pass@1 | format | mean length | train time |",
        "|---|---|---|---|---|---|",
        "| 1 base | base/step-000010 | 0.100 | 0.013 | 6.7 | 12 s |",
        "| 5 rejection sampling | kept.jsonl: 3 of 8 samples | | | | 3 s |",
        "\nguessing a digit scores pass@1 0.1; pass@1 is averaged over samples at temperature 0.6, top-p 0.95",
        "\nheld-out pass@1 (on the first prompts of the held-out set) and mean completion length "
        "during each RL stage:\n",
        "- R1-Zero: pass@1 at step 0: 0.100, 10: 0.250; length at step 1: 4, 2: 6, 3: 9, 4: 12, 5: 30",
        "\nwhole pipeline, evaluations included: 1.5 min"]
    # a --quick card says first that its numbers are a smoke test's, with the sizes it ran
    quick = pipe.card_lines(rows, curves, 90, quick=True)
    assert quick[0] == ("smoke test (--quick): every stage runs; on 20 prompts x 2 samples these numbers are noise, "
                        "not a result") and quick[2:] == full
    assert pipe.SIZES["quick"]["num_test"] == 20 and pipe.SIZES["quick"]["eval_samples"] == 2
    assert not any("smoke" in line for line in full)


def test_curve_reads_an_rl_stages_metrics(tmp_path):
    lines = [{"args": {}}, {"step": 0, "eval_pass@1": 0.1, "eval_len": 4.0}, {"step": 1, "len": 5.5, "reward": 0.2},
             {"step": 2, "len": 7.0, "reward": 0.4}, {"step": 2, "eval_pass@1": 0.3, "eval_len": 9.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert pipe.curve(str(tmp_path)) == {"eval": [[0, 0.1], [2, 0.3]], "len": [[1, 5.5], [2, 7.0]]}


def test_stages_reuse_unchanged_commands_and_rerun_what_follows_a_change(tmp_path, capsys):
    data = str(tmp_path / "data")

    def both(flags_a, fresh=False):
        stages = pipe.Stages(str(tmp_path), fresh)
        stages.run("a", "data/sums/prepare.py", ["--out-dir", data, "--num-pretrain", 5, *flags_a])
        stages.run("b", "data/sums/prepare.py", ["--out-dir", data, "--num-pretrain", 7])
        return capsys.readouterr().out

    first = both([])
    assert "[a] python data/sums/prepare.py" in first and "[b] python" in first
    assert len(records(tmp_path / "data" / "pretrain.jsonl")) == 7
    done = json.load(open(tmp_path / "stages.json"))
    assert list(done) == ["a", "b"] and done["b"]["command"].endswith("--num-pretrain 7")
    again = both([])
    assert "[a] unchanged" in again and "[b] unchanged" in again
    changed = both(["--seed", 3])  # a changed: a runs, and b after it, though b's command is the same
    assert "[a] python" in changed and "[b] python" in changed
    assert "[a] unchanged" in both(["--seed", 3]) and "[a] python" in both(["--seed", 3], fresh=True)
    assert (tmp_path / "logs" / "a.log").read_text().startswith(data)


def test_a_rerun_forgets_later_stages_before_it_starts(tmp_path, capsys):
    """a reruns and b then fails: b's old record must not be reused by the next run, which
    finds a unchanged; and a stage's output folder is emptied before it runs."""
    data, folder = str(tmp_path / "data"), tmp_path / "a-out"

    def run(seed_a, min_times_b, stale=False):
        stages = pipe.Stages(str(tmp_path), False)
        folder.mkdir(exist_ok=True)
        (folder / "step-999999").mkdir(exist_ok=True)  # a checkpoint of an older run
        stages.run("a", "data/sums/prepare.py", ["--out-dir", data, "--num-pretrain", 5, "--seed", seed_a],
                   out=str(folder))
        assert (folder / "step-999999").exists() == stale  # emptied when a ran, kept when reused
        stages.run("b", "data/sums/prepare.py", ["--out-dir", data, "--num-pretrain", 5, "--min-times", min_times_b])

    run(0, 1)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="stage b failed"):
        run(1, 0)  # a reruns with a new seed, then b fails
    assert list(json.load(open(tmp_path / "stages.json"))) == ["a"]
    run(1, 1, stale=True)  # a is unchanged and reused; b must run, not be reused
    out = capsys.readouterr().out
    assert "[a] unchanged" in out and "[b] python" in out


def test_a_failing_stage_names_itself_and_its_log(tmp_path):
    stages = pipe.Stages(str(tmp_path), False)
    with pytest.raises(SystemExit, match=r"stage broken failed \(exit 2\); its log is .*broken\.log"):
        stages.run("broken", "data/sums/prepare.py", ["--out-dir", str(tmp_path), "--min-times", 0])
    assert "--min-times" in (tmp_path / "logs" / "broken.log").read_text()
    assert not (tmp_path / "stages.json").exists()  # a failed stage is not recorded as done


def test_plot_writes_a_png_or_says_why_not(tmp_path):
    rows = [{"stage": "1 base", "pass@1": 0.1, "format": 0.0}, {"stage": "5 rejection", "seconds": 1},
            {"stage": "4 reasoning RL", "pass@1": 0.4, "format": 0.99}]
    curves = {"zero": {"eval": [[0, 0.1], [10, 0.3]], "len": [[1, 4.0], [2, 9.0]]}, "rl": {"eval": [], "len": []}}
    path = str(tmp_path / "card.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert pipe.plot(rows, curves, path) is False and not os.path.exists(path)
        return
    assert pipe.plot(rows, curves, path) is True
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_labels_every_bar_and_titles_a_quick_card(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", minversion="3.8")  # Figure.get_suptitle
    import matplotlib.pyplot as plt

    rows = [{"stage": "1 base", "pass@1": 0.1, "format": 0.0}, {"stage": "2 R1-Zero", "pass@1": 0.0, "format": 0.0},
            {"stage": "4 reasoning RL", "pass@1": 0.4, "format": 0.99}]
    curves = {"zero": {"eval": [[0, 0.1], [10, 0.3]], "len": [[1, 4.0], [2, 9.0]]}}
    closed, close = [], plt.close
    monkeypatch.setattr(plt, "close", closed.append)  # keep the figures to look at them
    for quick in [False, True]:
        assert pipe.plot(rows, curves, str(tmp_path / f"card-{quick}.png"), quick) is True
    full, quick = closed
    # each bar's value above it, so that a bar of height 0 still shows: pass@1 first, then format
    labels = [t.get_text() for t in full.axes[0].texts]
    assert labels == ["0.10", "0.00", "0.40", "0.00", "0.00", "0.99"]
    assert full.get_suptitle() == "" and quick.get_suptitle() == pipe.SMOKE
    for fig in [full, quick]:
        close(fig)


# ----------------------------------------------------------------------------------------
# end to end: every stage, shortened


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "data", "sums", "pipeline.py"), "--quick", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    card = json.load(open(out / "card.json"))
    assert [r["stage"] for r in card["rows"]] == [
        "1 base", "2 R1-Zero", "3 cold start", "4 reasoning RL", "5 rejection sampling", "6 base SFT on kept",
        "7 second RL", "8 small base", "8 student, cold-start data", "8 student, distilled"]
    # every model row is what reject_sample.py measured for that checkpoint
    for row, name in zip([r for r in card["rows"] if "pass@1" in r],
                         ["base", "zero", "cold", "rl", "rs", "rl2", "small", "student-cold", "student"]):
        report = json.load(open(out / "eval" / f"{name}.report.json"))
        assert (row["pass@1"], row["format"], row["len"]) == (report["pass@1"], report["format"], report["len"])
        assert json.load(open(out / "eval" / f"{name}.run.json"))["model"] == str(out / row["model"])
        assert os.path.exists(out / row["model"] / "model.safetensors")
        assert report["prompts"] == 20 and report["samples"] == 40
    # the kept samples are what the student was trained on, each one verified
    kept = records(out / "kept.jsonl")
    assert kept and card["rows"][4]["model"].startswith(f"kept.jsonl: {len(kept)} of 400 samples")
    assert all(R.accuracy(k["completion"], k) == 1.0 and R.format_reward(k["completion"], k) == 1.0 for k in kept)
    for name, model in [("student", "small"), ("rs", "base")]:  # both learn from the kept samples
        args = json.load(open(out / name / "args.json"))
        assert args["data"] == str(out / "kept.jsonl") and args["model"].startswith(str(out / model))
    assert json.load(open(out / "rl2" / "args.json"))["model"].startswith(str(out / "rs"))
    # the RL stages' curves: held-out pass@1 at steps 0, 2 and the last; a length at every step
    assert [step for step, _ in card["curves"]["zero"]["eval"]] == [0, 2, 3]
    assert [step for step, _ in card["curves"]["rl2"]["len"]] == [1, 2]
    md = (out / "card.md").read_text()
    assert md.startswith(pipe.SMOKE + "\n\n| stage | model | held-out pass@1 |") and "whole pipeline" in md
    assert "[pretrain] python sft.py --init scratch" in first.stdout
    for name, stage in json.load(open(out / "stages.json")).items():  # no flag given twice (the last would win)
        flags = [w for w in stage["command"].split() if w.startswith("--")]
        assert len(flags) == len(set(flags)), (name, stage["command"])
    # run again: nothing changed, so every stage is reused and the card is the same
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("unchanged, reused") == len(json.load(open(out / "stages.json")))
    assert json.load(open(out / "card.json"))["rows"] == card["rows"]
    # styles.py samples a checkpoint of the run and splits its answers by style
    cold = str(out / card["rows"][2]["model"])
    cmd = [sys.executable, os.path.join(ROOT, "data", "sums", "styles.py"), "--model", cold,
           "--data", str(out / "data" / "fresh.jsonl"), "--max-prompts", "5", "--num-samples", "2"]
    styles = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert styles.returncode == 0, styles.stderr[-3000:]
    lines = styles.stdout.splitlines()
    assert lines[0].startswith("10 samples from 5 prompts of ")
    shares = [float(re.search(r"share (\S+),", line).group(1)) for line in lines[1:]]
    assert shares and abs(sum(shares) - 1) < 0.011
