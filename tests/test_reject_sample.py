"""reject_sample.py: pass@k and cons@k by hand, the keep rules on hand-made samples, runs on a
tiny model trained to answer (files, report, resume, torchrun), and the hand-off to sft.py."""

import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import reject_sample as RS
import rewards as R
import sft
from nanor1 import common, grader, models, sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = "<think> {} </think> <answer> {} </answer>"


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def flags(*extra):
    return RS.get_args(["--model", "m", "--data", "d", "--eval-only", *extra])


# ------------------------------------------------------------------------- the report's numbers

@pytest.mark.parametrize("n, c, k, want", [
    (4, 1, 1, 0.25), (4, 1, 2, 0.5), (4, 2, 2, 5 / 6), (5, 2, 3, 0.9), (4, 0, 3, 0.0), (4, 4, 1, 1.0),
    (8, 1, 8, 1.0), (8, 7, 1, 0.875),
])
def test_pass_at_k_hand_values(n, c, k, want):
    # (4, 2, 2): 1 - C(2,2)/C(4,2) = 1 - 1/6; (5, 2, 3): 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert RS.pass_at_k(n, c, k) == pytest.approx(want)


def test_pass_at_k_equals_counting_every_draw():
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                draws = list(itertools.combinations(samples, k))
                assert RS.pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
    with pytest.raises(ValueError):
        RS.pass_at_k(4, 1, 5)


def test_majority_vote_groups_equal_values_and_breaks_ties_by_first_seen():
    # 1/2, 0.5 and \frac{1}{2} are one answer with 3 votes; 3 has 2; no answer does not vote
    assert RS.majority_vote(["3", "1/2", "0.5", None, "3", "\\frac{1}{2}"], "0.5") == ("1/2", True)
    assert RS.majority_vote(["3", "4", "4", "3"], "4") == ("3", False)  # 2 against 2: 3 came first
    # a computation left undone is not in the group of its value, whichever comes first
    assert RS.majority_vote(["76+36", "112", "112"], "112") == ("112", True)
    assert RS.majority_vote(["7", "  7 ", "x", "y"], "7") == ("7", True)  # whitespace is not a new answer
    assert RS.majority_vote([None, None], "1") == (None, False)


def test_majority_vote_compares_a_repeated_answer_once():
    calls = []

    def equal(a, b):
        calls.append((a, b))
        return a == b
    RS.majority_vote(["5", "6", "5", "5", "6", "7"], "6", equal)
    # "6" against "5"; "7" against "5" and "6"; then the winner "5" against the gold "6"
    assert calls == [("6", "5"), ("7", "5"), ("7", "6"), ("5", "6")]


def record(num_correct, cons, num_format=0, num_truncated=0, num_tokens=40, num_kept=0, k=4, **dropped):
    return {"num_samples": k, "num_correct": num_correct, "pass_rate": num_correct / k, "cons_correct": cons,
            "num_format": num_format, "num_truncated": num_truncated, "num_tokens": num_tokens,
            "num_kept": num_kept, "dropped": {why: dropped.get(why, 0) for why in RS.REASONS}}


def test_summarize_hand_values():
    records = [record(1, True, num_format=2, num_truncated=1, num_tokens=40, num_kept=1, wrong=3),
               record(0, False, num_format=0, num_truncated=4, num_tokens=100, truncated=4),
               record(4, True, num_format=4, num_tokens=16, num_kept=2, duplicate=2)]
    rep = RS.summarize(records, (0.1, 0.9))
    assert rep["prompts"] == 3 and rep["samples"] == 12
    assert rep["pass@1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert rep["pass@2"] == pytest.approx((0.5 + 0 + 1) / 3)  # 1 - C(3,2)/C(4,2) = 0.5
    assert rep["pass@4"] == pytest.approx(2 / 3)
    assert rep["cons@4"] == pytest.approx(2 / 3)
    assert rep["format"] == pytest.approx(6 / 12) and rep["trunc"] == pytest.approx(5 / 12)
    assert rep["len"] == pytest.approx(156 / 12)
    assert rep["kept"] == 3 and rep["prompts_kept"] == 2
    assert rep["dropped"] == {"truncated": 4, "wrong": 3, "format": 0, "language": 0, "long": 0,
                              "duplicate": 2, "cap": 0}
    assert rep["rl_prompts"] == 1  # only 0.25 is strictly inside (0.1, 0.9)
    assert RS.summarize([record(1, None, k=3)])["cons@3"] is None  # no answer to vote on (code tasks)
    assert [key for key in RS.summarize([record(1, True, k=6)]) if key.startswith("pass@")] == \
        ["pass@1", "pass@2", "pass@4", "pass@6"]


# ------------------------------------------------------------------------- the keep rules

def sample(text, correct=True, truncated=False, num_tokens=10, lang="en"):
    return {"text": text, "correct": correct, "truncated": truncated, "num_tokens": num_tokens, "lang": lang}


GOOD = T.format("we add the two numbers and get 19", "19")


@pytest.mark.parametrize("s, want", [
    (sample(GOOD), None),
    (sample(GOOD, truncated=True), "truncated"),
    (sample(GOOD, correct=False, truncated=True), "truncated"),  # the first rule broken is the one counted
    (sample(GOOD, correct=False), "wrong"),
    (sample("we add and get 19 <answer> 19 </answer>"), "format"),
    (sample(GOOD + " and more text"), "format"),
    (sample(T.format("we add the numbers 所以答案是 19", "19")), "language"),  # 4 of 9 words are English
    (sample(T.format("12 + 7 = 19", "19")), None),  # only math: no words, so not mixed
    (sample(T.format("我们把两个数相加", "19"), lang="zh"), None),
    (sample(GOOD, num_tokens=101), "long"),
])
def test_reject_reason_on_hand_made_samples(s, want):
    assert RS.reject_reason(s, "r1", 0.95, 100) == want


def test_format_and_language_checks_can_be_switched():
    mixed = sample(T.format("we add the numbers 所以答案是 19", "19"))
    assert RS.reject_reason(mixed, "r1", 0.0, 0) is None  # --min-language 0: no check
    # 4 English words of 9 (each Chinese character is a word): 0.444
    assert RS.reject_reason(mixed, "r1", 0.44, 0) is None and RS.reject_reason(mixed, "r1", 0.45, 0) == "language"
    distilled = sample("<think> we add them </think> The answer is \\boxed{19}.")
    assert RS.reject_reason(distilled, "r1", 0.95, 0) == "format"
    assert RS.reject_reason(distilled, "think", 0.95, 0) is None
    assert RS.reject_reason(distilled, "none", 0.95, 0) is None
    for text in ["<think> we add them </think>", "we add them </think> 19", "<think> a </think> b </think> 19",
                 "<think> <think> a </think> 19"]:
        assert RS.reject_reason(sample(text), "think", 0.95, 0) == "format", text
    assert RS.reject_reason(sample("no tags at all, 19"), "none", 0.95, 0) is None


def test_select_shortest_first_drops_duplicates_then_caps():
    a, b, c = sample("<think> a </think>", num_tokens=9), sample("<think> b </think>", num_tokens=5), \
        sample("<think>  b\n</think>", num_tokens=6)  # c is b with other whitespace
    d, e = sample("<think> d </think>", num_tokens=5), sample("<think> e </think>", num_tokens=7)
    kept, dropped = RS.select([a, b, c, d, e], 3, "shortest", None)
    assert kept == [b, d, e] and dropped == {"duplicate": 1, "cap": 1}  # b before d: same length, earlier
    kept, dropped = RS.select([a, b, c, d, e], 0, "shortest", None)  # 0 = every distinct one
    assert kept == [b, d, e, a] and dropped == {"duplicate": 1, "cap": 0}
    assert [s["copies"] for s in kept] == [2, 1, 1, 1]  # b stands for c too


def test_select_random_order_is_seeded():
    import numpy as np
    samples = [sample(f"<think> {i} </think>", num_tokens=i) for i in range(20)]
    first = RS.select(samples, 5, "random", np.random.default_rng([0, 3]))[0]
    assert first == RS.select(samples, 5, "random", np.random.default_rng([0, 3]))[0]
    assert first != RS.select(samples, 5, "random", np.random.default_rng([0, 4]))[0]
    assert first != samples[:5] and len(first) == 5


def row(text, truncated=False, num_tokens=10):
    """One scored sample as sampling.rollout returns it, scored by the real rewards."""
    total, parts, _ = R.score(text, {"answer": "19"}, R.parse_rewards("accuracy,format:0.5"))
    return {"text": text, "completion": list(range(num_tokens)), "truncated": truncated, "reward": total,
            "parts": parts}


def test_judge_prompt_counts_and_kept_lines():
    args = flags("--rewards", "accuracy,format:0.5", "--keep-per-prompt", "2")
    rows = [row(GOOD, num_tokens=12), row(T.format("so 19", "19"), num_tokens=8),
            row(T.format("so 19", "19"), num_tokens=8),  # a duplicate
            row(T.format("it is 20", "20")),  # wrong
            row("it is 19", num_tokens=5),  # correct, no tags
            row("<think> it is 19 and", truncated=True, num_tokens=20),
            row(T.format("we add the numbers, 十九", "19"), num_tokens=11)]  # mixed language
    ex = {"prompt": "What is 12 + 7?", "answer": "19", "source": "hand", "_where": "t.jsonl:4"}
    rec, lines = RS.judge_prompt(3, ex, rows, args, "accuracy")
    assert rec["num_correct"] == 5 and rec["pass_rate"] == pytest.approx(5 / 7)
    assert rec["dropped"] == {"truncated": 1, "wrong": 1, "format": 1, "language": 1, "long": 0,
                              "duplicate": 1, "cap": 0}
    assert rec["num_kept"] == 2 and rec["num_format"] == 5 and rec["num_truncated"] == 1
    assert rec["num_tokens"] == 12 + 8 + 8 + 10 + 5 + 20 + 11
    assert (rec["cons_answer"], rec["cons_correct"]) == ("19", True)  # 19 x5 (truncated: no vote), 20 x1
    assert rec["source"] == "hand" and "_where" not in rec and rec["prompt_index"] == 3
    assert [l["completion"] for l in lines] == [T.format("so 19", "19"), GOOD]  # shortest first
    assert lines[0] == {"prompt": "What is 12 + 7?", "completion": T.format("so 19", "19"), "score": 1.5,
                        "parts": {"accuracy": 1.0, "format": 1.0}, "num_tokens": 8, "copies": 2, "answer": "19",
                        "model": "m", "prompt_index": 3}
    assert lines[1]["copies"] == 1


# ------------------------------------------------------------------------- runs on a tiny model

PROMPTS = [{"prompt": "What is 12 + 7?", "answer": "19"}, {"prompt": "What is 8 * 9?", "answer": "72"},
           {"prompt": "What is 100 - 1?", "answer": "99"}, {"prompt": "Add 3 and 40", "answer": "43"},
           {"prompt": "What is 5 + 5?", "answer": "10"}]


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """The tiny model fine-tuned (sft.py) to answer each prompt in a known mix of ways: right,
    wrong, mixed language, without tags. Sampling from it gives every kind of sample."""
    d = tmp_path_factory.mktemp("trained")
    mix = {0: [(T.format("12 + 7 = 19", "19"), 3), (T.format("12 + 7 = 18", "18"), 1)],
           1: [(T.format("8 * 9 = 72", "72"), 2), (T.format("8 * 9 = 72 所以答案是七十二", "72"), 2)],
           2: [(T.format("100 - 1 = 99", "99"), 2), ("100 - 1 = 99 so the answer is 99", 2)],
           3: [(T.format("3 + 40 = 44", "44"), 4)],
           4: [(T.format("5 + 5 = 10", "10"), 2), (T.format("5 + 5 = 10 , 10", "10"), 2)]}
    rows = [{"prompt": PROMPTS[i]["prompt"], "completion": c} for i, m in mix.items() for c, n in m for _ in range(n)]
    data = write_jsonl(d / "sft.jsonl", rows)
    sft.main(["--model", tiny_dir, "--data", data, "--out", str(d / "sft"), "--device", "cpu", "--num-steps", "150",
              "--batch-size", "20", "--micro-batch-size", "20", "--lr", "1e-2", "--val-fraction", "0",
              "--warmup-steps", "5", "--template", "raw"])
    return str(d / "sft" / "step-000150"), write_jsonl(d / "prompts.jsonl", PROMPTS)


def sample_run(model, data, out, *extra):
    return RS.main(["--model", model, "--data", data, "--out", str(out), "--device", "cpu", "--num-samples", "8",
                    "--max-new-tokens", "48", "--temperature", "1", "--top-p", "1", "--template", "raw", *extra])


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_run_keeps_only_verified_samples_and_reports_its_files(trained, tmp_path):
    model, data = trained
    out = tmp_path / "kept.jsonl"
    report = sample_run(model, data, out, "--prompts-per-batch", "2", "--rl-out", str(tmp_path / "rl.jsonl"))
    kept, passes = read(out), read(tmp_path / "kept.pass.jsonl")
    assert [p["prompt_index"] for p in passes] == [0, 1, 2, 3, 4]
    # every kept line passes every rule, checked here again from its text alone
    for line in kept:
        answer = PROMPTS[line["prompt_index"]]["answer"]
        assert line["prompt"] == PROMPTS[line["prompt_index"]]["prompt"] and line["answer"] == answer
        assert grader.math_equal(line["completion"], answer) and R.format_reward(line["completion"], {}) == 1
        thought = line["completion"].split("<think>")[1].split("</think>")[0]
        assert not R.words_by_script(thought) or R.language(line["completion"], {"lang": "en"}) >= 0.95
        assert line["score"] == 2.0 and line["model"] == model
    for p in passes:
        mine = [line["completion"] for line in kept if line["prompt_index"] == p["prompt_index"]]
        assert len(mine) == p["num_kept"] == len(set(mine)) <= 4
        assert p["pass_rate"] == p["num_correct"] / 8 and sum(p["dropped"].values()) == 8 - p["num_kept"]
    # the tiny model answers as it was taught: 3 + 40 is 44, 100 - 1 is 99 but half the time
    # without tags, 8 * 9 half the time with a chain of thought in two languages
    assert passes[3]["pass_rate"] == 0 and passes[3]["cons_answer"] == "44" and passes[3]["num_kept"] == 0
    assert passes[2]["pass_rate"] >= 0.75 and passes[2]["dropped"]["format"] > 0 and passes[2]["num_kept"] >= 1
    assert sum(p["dropped"]["language"] for p in passes) > 0
    assert sum(p["dropped"]["duplicate"] for p in passes) > 0
    assert report == json.load(open(tmp_path / "kept.report.json")) == RS.summarize(passes)
    assert report["kept"] == len(kept) > 0
    rl = read(tmp_path / "rl.jsonl")
    assert [r["prompt_index"] for r in rl] == [p["prompt_index"] for p in passes if 0.1 < p["pass_rate"] < 0.9]
    # the pass-rate file is prompts grpo.py can read
    tok = models.build_tiny_tokenizer()
    examples, _ = common.load_prompts(str(tmp_path / "rl.jsonl"), tok, "r1", ["answer"])
    assert [e["answer"] for e in examples] == [PROMPTS[r["prompt_index"]]["answer"] for r in rl]


def test_keep_flags_change_what_is_kept(trained, tmp_path):
    model, data = trained
    sample_run(model, data, tmp_path / "a.jsonl", "--prompts-per-batch", "5")
    sample_run(model, data, tmp_path / "b.jsonl", "--prompts-per-batch", "5", "--format-check", "none",
               "--min-language", "0", "--keep-per-prompt", "1")
    a, b = read(tmp_path / "a.pass.jsonl"), read(tmp_path / "b.pass.jsonl")
    assert [p["num_correct"] for p in a] == [p["num_correct"] for p in b]  # same seed, same samples
    assert all(p["dropped"]["format"] == p["dropped"]["language"] == 0 for p in b)
    assert [p["num_kept"] for p in b] == [min(1, p["num_kept"] + p["dropped"]["format"] + p["dropped"]["language"])
                                          for p in a]
    assert any("<answer>" not in line["completion"] for line in read(tmp_path / "b.jsonl"))


def test_eval_only_writes_nothing_and_reports_the_same_numbers(trained, tmp_path, monkeypatch, capsys):
    model, data = trained
    written = sample_run(model, data, tmp_path / "kept.jsonl", "--prompts-per-batch", "2")
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    report = RS.main(["--model", model, "--data", data, "--device", "cpu", "--num-samples", "8", "--max-new-tokens",
                      "48", "--temperature", "1", "--top-p", "1", "--prompts-per-batch", "2", "--template", "raw",
                      "--eval-only"])
    assert sorted(os.listdir(tmp_path)) == before
    assert report == written
    printed = capsys.readouterr().out
    assert f"pass@1 {report['pass@1']:.3f} | pass@2" in printed and f"cons@8 {report['cons@8']:.3f}" in printed
    # --report: the same report as json, the one file written
    again = RS.main(["--model", model, "--data", data, "--device", "cpu", "--num-samples", "8", "--max-new-tokens",
                     "48", "--temperature", "1", "--top-p", "1", "--prompts-per-batch", "2", "--template", "raw",
                     "--eval-only", "--report", "eval/r.json"])
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["eval"]) and os.listdir(tmp_path / "eval") == ["r.json"]
    assert json.load(open(tmp_path / "eval" / "r.json")) == again == written


def test_a_run_that_keeps_nothing_says_why_and_does_not_point_to_sft(trained, tmp_path, capsys):
    model, data = trained
    capsys.readouterr()
    # no completion is one token long: every sample that passes the other rules is dropped as long
    report = sample_run(model, data, tmp_path / "kept.jsonl", "--max-kept-tokens", "1")
    printed = capsys.readouterr().out
    assert report["kept"] == 0 and os.path.getsize(tmp_path / "kept.jsonl") == 0
    assert "sft.py" not in printed
    last = printed.strip().splitlines()[-1]
    assert last.startswith(f"kept no sample: {tmp_path / 'kept.jsonl'} is empty (dropped: ") and "long" in last


def print_run(model, capsys, *extra):
    """reject_sample.py --prompt ... -> what it printed, as [(prompt number, sample number, completion)]."""
    capsys.readouterr()
    RS.main(["--model", model, "--device", "cpu", "--max-new-tokens", "48", "--template", "raw", *extra])
    parts = re.split(r"^--- prompt (\d+), sample (\d+): .*\n", capsys.readouterr().out, flags=re.M)
    assert parts[0] == ""  # nothing before the first header
    return [(int(a), int(b), text.removesuffix("\n")) for a, b, text in zip(parts[1::3], parts[2::3], parts[3::3])]


def test_prompt_prints_what_sampling_gives_for_each_prompt_and_writes_nothing(trained, tmp_path, monkeypatch, capsys):
    model, _ = trained
    monkeypatch.chdir(tmp_path)
    texts = ["What is 12 + 7?", "Add 3 and 40"]
    printed = print_run(model, capsys, "--prompt", texts[0], "--prompt", texts[1], "--num-samples", "3",
                        "--temperature", "1", "--top-p", "1", "--seed", "5")
    assert [(i, j) for i, j, _ in printed] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert os.listdir(tmp_path) == []
    # the same samples drawn here: the raw text's tokens, each prompt with a generator seeded by --seed,
    # each completion cut before its first end token
    m, tok = models.load_model(model)
    eos = models.eos_ids(m, tok)
    want = []
    for text in texts:
        out = sampling.sample(m, [tok(text)["input_ids"]], 3, 48, eos, tok.pad_token_id, 1.0, 1.0,
                              torch.Generator().manual_seed(5), vocab=len(tok))
        for row in out["ids"].tolist():
            want.append(tok.decode(row[:next((t for t, x in enumerate(row) if x in eos), len(row))]))
    assert [text for _, _, text in printed] == want
    # the model was taught these answers: what it prints ends where it stopped, without its end token
    assert {text for _, _, text in printed[3:]} == {T.format("3 + 40 = 44", "44")}
    assert all(text in [T.format("12 + 7 = 19", "19"), T.format("12 + 7 = 18", "18")] for _, _, text in printed[:3])


def test_prompt_greedy_is_repeatable_and_is_what_generate_writes(trained, capsys):
    model, _ = trained
    greedy = ["--prompt", "What is 8 * 9?", "--prompt", "What is 100 - 1?", "--temperature", "0", "--num-samples", "1"]
    first = print_run(model, capsys, *greedy)
    assert print_run(model, capsys, *greedy, "--seed", "7") == first and len(first) == 2
    # Hugging Face's own greedy decoding, an independent implementation
    m, tok = models.load_model(model)
    eos = models.eos_ids(m, tok)
    for (_, _, text), prompt in zip(first, ["What is 8 * 9?", "What is 100 - 1?"]):
        ids = tok(prompt)["input_ids"]
        out = m.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=48, pad_token_id=tok.pad_token_id,
                         eos_token_id=eos)[0, len(ids):].tolist()
        assert text == tok.decode(out[:next((t for t, x in enumerate(out) if x in eos), len(out))])
    # one of the answers the model was taught for each prompt
    assert first[0][2] in [T.format("8 * 9 = 72", "72"), T.format("8 * 9 = 72 所以答案是七十二", "72")]
    assert first[1][2] in [T.format("100 - 1 = 99", "99"), "100 - 1 = 99 so the answer is 99"]


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "hi", "--out", "x.jsonl"], "--prompt prints and writes nothing: drop --out"),
    (["--prompt", "hi", "--eval-only"], "--prompt prints and writes nothing"),
    (["--prompt", "hi", "--rl-out", "x.jsonl"], "--prompt prints and writes nothing"),
    (["--prompt", "hi", "--report", "r.json"], "--prompt prints and writes nothing"),
    (["--prompt", "hi", "--data", "d"], "give --data FILE (prompts to sample, score and keep) or --prompt TEXT"),
    (["--out", "x.jsonl"], "give --data FILE (prompts to sample, score and keep) or --prompt TEXT"),
    (["--prompt", " "], "--prompt: a prompt is empty"),
])
def test_prompt_flags_that_contradict_it(argv, message, capsys):
    with pytest.raises(SystemExit):
        RS.get_args(["--model", "m", *argv])
    assert message in capsys.readouterr().err
    assert RS.get_args(["--model", "m", "--prompt", "a", "--prompt", "b"]).prompt == ["a", "b"]


class Crash(Exception):
    pass


def same_files(a, b, names=("kept.jsonl", "kept.pass.jsonl", "kept.report.json")):
    for name in names:
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read(), name


def test_interrupted_then_resumed_run_writes_the_same_files(trained, tmp_path, monkeypatch):
    model, data = trained
    sample_run(model, data, tmp_path / "a" / "kept.jsonl", "--prompts-per-batch", "2")
    # the same run, killed while writing the pass lines of its first batch (prompts 0 and 1):
    # the batch's kept lines are on disk, prompt 0's pass line whole, prompt 1's only half
    writes = []
    append = RS.append_lines

    def crashing_append(path, records):
        writes.append(path)
        if len(writes) == 2:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            cut = text.index("\n") + 1 + len(text.split("\n")[1]) // 2
            with open(path, "a", encoding="utf-8") as f:
                f.write(text[:cut])
            raise Crash
        append(path, records)
    monkeypatch.setattr(RS, "append_lines", crashing_append)
    with pytest.raises(Crash):
        sample_run(model, data, tmp_path / "b" / "kept.jsonl", "--prompts-per-batch", "2")
    monkeypatch.setattr(RS, "append_lines", append)
    assert writes[-1].endswith("kept.pass.jsonl")
    assert 1 in [l["prompt_index"] for l in read(tmp_path / "b" / "kept.jsonl")]  # prompt 1's orphan kept lines
    assert not open(tmp_path / "b" / "kept.pass.jsonl").read().endswith("\n")
    # resume: the first batch is sampled again whole, with the same seed, but only prompt 1 is
    # judged and written; then the other batches
    calls = []
    rollout = sampling.rollout
    monkeypatch.setattr(sampling, "rollout", lambda *a, **k: calls.append(a[2]) or rollout(*a, **k))
    sample_run(model, data, tmp_path / "b" / "kept.jsonl", "--prompts-per-batch", "2")
    assert [[e["prompt"] for e in examples] for examples in calls] == \
        [[PROMPTS[0]["prompt"], PROMPTS[1]["prompt"]], [PROMPTS[2]["prompt"], PROMPTS[3]["prompt"]], [PROMPTS[4]["prompt"]]]
    same_files(tmp_path / "a", tmp_path / "b")
    # a finished run, started again, samples nothing and changes nothing
    calls.clear()
    sample_run(model, data, tmp_path / "b" / "kept.jsonl", "--prompts-per-batch", "2")
    assert calls == []
    same_files(tmp_path / "a", tmp_path / "b")


def test_shards_of_a_killed_torchrun_run_are_folded_in(trained, tmp_path, monkeypatch):
    """Processes of a killed 2-process run left their shard pairs; one process picks them up."""
    model, data = trained
    sample_run(model, data, tmp_path / "a" / "kept.jsonl", "--prompts-per-batch", "1")
    b = tmp_path / "b"
    b.mkdir()
    (b / "kept.run.json").write_bytes((tmp_path / "a" / "kept.run.json").read_bytes())
    kept_lines = open(tmp_path / "a" / "kept.jsonl", "rb").read().splitlines(keepends=True)
    pass_lines = open(tmp_path / "a" / "kept.pass.jsonl", "rb").read().splitlines(keepends=True)
    for r in range(2):
        mine = [i for i in range(5) if i % 2 == r]
        if r == 0:
            mine.remove(2)  # process 0 had done prompts 0 and 4, and was killed in prompt 2's batch
        (b / f"kept.rank{r}of2.jsonl").write_bytes(b"".join(l for l in kept_lines if json.loads(l)["prompt_index"] in mine))
        (b / f"kept.rank{r}of2.pass.jsonl").write_bytes(
            b"".join(l for l in pass_lines if json.loads(l)["prompt_index"] in mine) + pass_lines[2][:20])
    calls = []
    rollout = sampling.rollout
    monkeypatch.setattr(sampling, "rollout", lambda *a, **k: calls.append(a[2]) or rollout(*a, **k))
    sample_run(model, data, b / "kept.jsonl", "--prompts-per-batch", "1")
    assert [[e["prompt"] for e in ex] for ex in calls] == [[PROMPTS[2]["prompt"]]]
    assert sorted(os.listdir(b)) == ["kept.jsonl", "kept.pass.jsonl", "kept.report.json", "kept.run.json"]
    same_files(tmp_path / "a", b)  # in prompt order, though prompt 2 was sampled last


def test_a_resume_refuses_changed_data(trained, tmp_path):
    model, _ = trained
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "kept.jsonl"
    sample_run(model, data, out, "--max-prompts", "2")
    write_jsonl(data, [{"prompt": "What is 2 + 2?", "answer": "4"}] + PROMPTS)  # a line inserted at the top
    with pytest.raises(SystemExit, match=r"prompt 0 was 'What is 12 \+ 7\?' but .*p.jsonl:1 is 'What is 2"):
        sample_run(model, data, out)
    assert len(read(tmp_path / "kept.pass.jsonl")) == 2  # nothing lost


def test_report_covers_every_prompt_in_the_files(trained, tmp_path):
    model, data = trained
    out = tmp_path / "kept.jsonl"
    full = sample_run(model, data, out, "--prompts-per-batch", "5")
    again = sample_run(model, data, out, "--prompts-per-batch", "5", "--max-prompts", "2")
    assert again == full and again["prompts"] == 5 and again["kept"] == len(read(out))


@pytest.mark.slow
def test_torchrun_two_processes_write_what_one_process_writes(trained, tmp_path):
    model, data = trained
    sample_run(model, data, tmp_path / "one" / "kept.jsonl", "--prompts-per-batch", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "reject_sample.py"), "--model", model, "--data", data,
           "--out", str(tmp_path / "two" / "kept.jsonl"), "--device", "cpu", "--num-samples", "8",
           "--max-new-tokens", "48", "--temperature", "1", "--top-p", "1", "--prompts-per-batch", "1", "--template", "raw"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("prompts x 8 samples") == 2  # the header and the report, printed by process 0 only
    assert sorted(os.listdir(tmp_path / "two")) == ["kept.jsonl", "kept.pass.jsonl", "kept.report.json",
                                                   "kept.run.json"]  # the shards were merged and removed
    # with one prompt per batch each prompt's random numbers depend only on the seed and the
    # prompt, so the merged files equal the one-process files byte for byte
    same_files(tmp_path / "one", tmp_path / "two")
    # --eval-only: nothing written, the records gathered in memory, the same report printed
    cmd = [c for c in cmd if c != str(tmp_path / "two" / "kept.jsonl")]
    cmd[cmd.index("--out")] = "--eval-only"
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.load(open(tmp_path / "one" / "kept.report.json"))
    assert "\n".join(RS.report_lines(report, (0.1, 0.9))) in done.stdout


@pytest.mark.slow
def test_kept_samples_train_a_student_with_sft(trained, tiny_dir, tmp_path):
    model, data = trained
    out = tmp_path / "kept.jsonl"
    sample_run(model, data, out, "--prompts-per-batch", "5", "--keep-per-prompt", "1")
    kept = read(out)
    history = sft.main(["--model", tiny_dir, "--data", str(out), "--out", str(tmp_path / "student"), "--device",
                        "cpu", "--num-steps", "100", "--batch-size", str(len(kept)), "--micro-batch-size", "4",
                        "--lr", "1e-2", "--val-fraction", "0", "--warmup-steps", "2", "--template", "raw"])
    assert len(kept) >= 3 and history[0]["ce"] > 3 and history[-1]["ce"] < 0.1
    # the student, from random weights, now writes the teacher's kept answer to each prompt
    student, tok = models.load_model(str(tmp_path / "student" / "step-000100"))
    out = sampling.sample(student, [common.encode_prompt(line["prompt"], tok, "raw") for line in kept], 1, 48,
                          models.eos_ids(student, tok), tok.pad_token_id, temperature=0)
    for line, ids, mask in zip(kept, out["ids"].tolist(), out["mask"].tolist()):
        assert tok.decode(ids[: sum(mask)], skip_special_tokens=True) == line["completion"]


# ------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, message", [
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--keep-per-prompt", "-1"], "--keep-per-prompt must be 0 or more"),
    (["--temperature", "-1"], "--temperature must be a number >= 0"),
    (["--temperature", "nan"], "--temperature must be a number >= 0"),
    (["--temperature", "0"], "--temperature 0 is greedy: its samples would all be the same"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--min-language", "1.5"], "--min-language must be in [0, 1]"),
    (["--rewards", "format"], "--rewards format: name one of accuracy, code"),
    (["--rewards", "acuracy"], "--rewards: unknown reward 'acuracy'"),
    (["--lang", "xx"], "--lang: unknown language 'xx'"),
    (["--rl-range", "0.9", "0.1"], "--rl-range LO HI: expected 0 <= LO < HI <= 1"),
    (["--rl-range", "half"], "argument --rl-range: expected 2 arguments"),
    (["--eval-only", "--rl-out", "x.jsonl"], "--eval-only writes no samples"),
    (["--eval-only", "--out", "x.jsonl"], "--eval-only writes no samples"),
    (["--out", "o/kept.jsonl", "--report", "o/kept.pass.jsonl"], "--report o/kept.pass.jsonl: is one of the files"),
    (["--eval-only", "--report", "."], "--report .: is a folder"),
    (["--out", "o/kept.jsonl", "--rl-out", "o/kept.pass.jsonl"], "--rl-out o/kept.pass.jsonl: is one of the files of --out"),
    (["--out", "o/kept.jsonl", "--rl-out", "."], "--rl-out .: is a folder"),
    ([], "--out is required"),
])
def test_bad_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        RS.get_args(["--model", "m", "--data", "d", *argv])
    assert message in capsys.readouterr().err


def test_out_folder_and_foreign_or_mismatched_files_are_refused(trained, tmp_path, capsys):
    model, data = trained
    with pytest.raises(SystemExit):
        RS.get_args(["--model", model, "--data", data, "--out", str(tmp_path)])
    assert "is a folder" in capsys.readouterr().err
    out = tmp_path / "kept.jsonl"
    out.write_text('{"prompt": "mine", "completion": "not yours"}\n')
    with pytest.raises(SystemExit, match="was not written by this script"):
        sample_run(model, data, out, "--max-prompts", "1")
    assert out.read_text() == '{"prompt": "mine", "completion": "not yours"}\n'  # nothing lost
    sample_run(model, data, out, "--max-prompts", "1", "--overwrite")
    with pytest.raises(SystemExit, match="written with --temperature 1.0, not 0.6"):
        RS.main(["--model", model, "--data", data, "--out", str(out), "--device", "cpu", "--num-samples", "8",
                 "--max-new-tokens", "48", "--template", "raw"])
    for extra, message in [(["--seed", "1"], "--seed 0, not 1"), (["--rewards", "accuracy"], "--rewards accuracy,format"),
                           (["--keep-per-prompt", "2"], "--keep-per-prompt 4, not 2"),
                           (["--format-check", "think"], "--format-check r1, not think")]:
        with pytest.raises(SystemExit, match=message):
            sample_run(model, data, out, "--max-prompts", "1", *extra)
    with pytest.raises(SystemExit, match="written with --max-new-tokens 48, not "):  # left out: fitted, then checked
        RS.main(["--model", model, "--data", data, "--out", str(out), "--device", "cpu", "--num-samples", "8",
                 "--temperature", "1", "--top-p", "1", "--template", "raw", "--max-prompts", "2"])
    sample_run(model, data, out, "--max-prompts", "1", "--prompts-per-batch", "3")  # batching may change
    pass_file = tmp_path / "kept.pass.jsonl"
    pass_file.write_text(pass_file.read_text() + "garbage\n" + pass_file.read_text())
    with pytest.raises(SystemExit, match=f"{pass_file}:2: not a line reject_sample.py wrote"):
        sample_run(model, data, out, "--max-prompts", "2")


def test_bad_data_is_reported_before_any_file_is_written(trained, tmp_path):
    model, _ = trained
    data = write_jsonl(tmp_path / "p.jsonl", [PROMPTS[0], {"prompt": "What is 1 + 1?"}])
    with pytest.raises(SystemExit, match=r"p.jsonl:2: missing field 'answer'"):
        sample_run(model, data, tmp_path / "out" / "kept.jsonl")
    assert not (tmp_path / "out").exists()


def test_an_unknown_language_in_the_data_names_its_line(trained, tmp_path):
    model, _ = trained
    data = write_jsonl(tmp_path / "p.jsonl", [PROMPTS[0], {**PROMPTS[1], "lang": "english"}])
    with pytest.raises(SystemExit, match=r"p.jsonl:2: unknown language 'english'"):
        sample_run(model, data, tmp_path / "kept.jsonl")


def test_correctness_follows_the_reward_named_in_rewards(tmp_path):
    texts = [T.format("short", "19"), T.format("a much longer chain of thought that goes on and on", "19"),
             T.format("short", "20")]
    ex = {"prompt": "What is 12 + 7?", "answer": "19"}
    for spec, correct_name in [("cosine,format", "cosine"), ("format,accuracy", "accuracy")]:
        rewards = R.parse_rewards(spec)
        rows = []
        for text, n in zip(texts, [10, 900, 10]):
            total, parts, _ = R.score(text, {**ex, "num_tokens": n, "max_tokens": 1000}, rewards)
            rows.append({"text": text, "completion": [0] * n, "truncated": False, "reward": total, "parts": parts})
        rec, lines = RS.judge_prompt(0, ex, rows, flags("--rewards", spec), correct_name)
        # cosine: a right answer earns 0.5 to 1 whatever its length, a wrong one -1 to -0.5
        assert rec["num_correct"] == 2 and [l["completion"] for l in lines] == texts[:2]
    code_ex = {"prompt": "Print the sum of two numbers", "tests": [{"input": "2 3\n", "output": "5\n"},
                                                                   {"input": "1 1\n", "output": "2\n"}]}
    right = "<think> add </think> <answer>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```\n</answer>"
    half = "<think> add </think> <answer>\n```python\nprint(5)\n```\n</answer>"
    for spec in ["code", "code_strict"]:
        rewards = R.parse_rewards(spec)
        rows = [{"text": t, "completion": [0] * 10, "truncated": False, **dict(zip(["reward", "parts"], R.score(t, code_ex, rewards)[:2]))}
                for t in [right, half]]
        rec, lines = RS.judge_prompt(0, code_ex, rows, flags("--rewards", spec), spec)
        assert rows[1]["parts"][spec] == (0.5 if spec == "code" else 0.0)  # one test of two passed
        assert rec["num_correct"] == 1 and [l["completion"] for l in lines] == [right]
        assert rec["cons_answer"] is None and rec["cons_correct"] is None  # no answer to vote on
