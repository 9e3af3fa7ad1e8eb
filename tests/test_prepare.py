"""data/<name>/prepare.py for GSM8K, MATH and code: parsed answers, seeded splits, errors that name
file:line and write nothing, the message when no data is available, and a code set whose every
task is solvable. The scripts run as subprocesses on small files written here; `datasets` is
replaced by a fake package on PYTHONPATH, so nothing touches the network."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

import rewards
from nanor1 import common, sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBJECTS = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
            "prealgebra", "precalculus"]


def run(name, *args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data", name, "prepare.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read(path):
    return [json.loads(line) for line in open(path)]


def gsm8k_row(q, a):
    return {"question": q, "answer": f"She has 3 + 4 = <<3+4=7>>7.\n#### {a}"}


def math_row(p, s, level="Level 1", subject="Algebra"):
    return {"problem": p, "solution": s, "level": level, "type": subject}


def fake_datasets(tmp_path, body):
    """An env whose `import datasets` finds body instead of any installed package."""
    pkg = tmp_path / "fake" / "datasets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    return dict(os.environ, PYTHONPATH=str(pkg.parent))


def load_code_module():
    spec = importlib.util.spec_from_file_location("code_prepare", os.path.join(ROOT, "data", "code", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------
# GSM8K


def test_gsm8k_answers_and_official_test(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [gsm8k_row(" How many? ", "72"), gsm8k_row("Big?", "1,234"),
                                                   gsm8k_row("Owed?", "-5"), gsm8k_row("Huge?", "1,234,567")])
    test = write_jsonl(tmp_path / "test.jsonl", [gsm8k_row("T1?", "10"), gsm8k_row("T2?", "2,000")])
    out = tmp_path / "out"
    r = run("gsm8k", "--train-file", train, "--test-file", test, "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert read(out / "train.jsonl") == [{"prompt": "How many?", "answer": "72", "lang": "en"},
                                         {"prompt": "Big?", "answer": "1234", "lang": "en"},
                                         {"prompt": "Owed?", "answer": "-5", "lang": "en"},
                                         {"prompt": "Huge?", "answer": "1234567", "lang": "en"}]
    assert read(out / "test.jsonl") == [{"prompt": "T1?", "answer": "10", "lang": "en"},
                                        {"prompt": "T2?", "answer": "2000", "lang": "en"}]
    assert f"{out / 'train.jsonl'}: 4 questions" in r.stdout and f"{out / 'test.jsonl'}: 2 questions" in r.stdout
    assert sorted(os.listdir(out)) == ["test.jsonl", "train.jsonl"]  # no temporary file left behind

    # --num-test with an official test file samples it; train stays whole
    r = run("gsm8k", "--train-file", train, "--test-file", test, "--num-test", 1, "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert len(read(out / "train.jsonl")) == 4
    assert [t["prompt"] for t in read(out / "test.jsonl")] in (["T1?"], ["T2?"])


# ----------------------------------------------------------------------------------------
# MATH


def test_math_boxed_answers_levels_and_skips(tmp_path):
    rows = [math_row("Half?", r"So the answer is $\boxed{\frac{1}{2}}$. Then $\{x \mid x^{2} > {1}\}$.", "Level 2"),
            math_row("Two boxes?", r"First $\boxed{3}$; no, it is $\boxed{4}$.", "Level 5", "Geometry"),
            math_row("Nested?", r"$\boxed{\sqrt{x^{2}+\left\{1\right\}}}$", "Level ?"),
            math_row("No box?", "The answer is 7.", "Level 1"),
            math_row("Unbalanced?", r"$\boxed{3$", "Level 1"),
            {"problem": "prm800k style?", "solution": r"\boxed{(1, 2)}", "level": 3, "subject": "Precalculus"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", [math_row("T1?", r"\boxed{0}", "Level 1"),
                                                 math_row("T3?", r"\boxed{0}", "Level 3")])
    out = tmp_path / "out"
    r = run("math", "--train-file", train, "--test-file", test, "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert read(out / "train.jsonl") == [
        {"prompt": "Half?", "answer": r"\frac{1}{2}", "lang": "en", "level": 2, "subject": "Algebra"},
        {"prompt": "Two boxes?", "answer": "4", "lang": "en", "level": 5, "subject": "Geometry"},
        {"prompt": "Nested?", "answer": r"\sqrt{x^{2}+\left\{1\right\}}", "lang": "en", "level": None,
         "subject": "Algebra"},
        {"prompt": "prm800k style?", "answer": "(1, 2)", "lang": "en", "level": 3, "subject": "Precalculus"}]
    assert "train: 6 problems, 2 without a \\boxed answer (skipped), 0 outside --levels" in r.stdout
    assert f"{out / 'train.jsonl'}: 4 problems" in r.stdout

    r = run("math", "--train-file", train, "--test-file", test, "--levels", "2,3", "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert [x["prompt"] for x in read(out / "train.jsonl")] == ["Half?", "prm800k style?"]
    assert "train: 6 problems, 2 without a \\boxed answer (skipped), 2 outside --levels" in r.stdout
    assert [x["prompt"] for x in read(out / "test.jsonl")] == ["T3?"]
    r = run("math", "--train-file", train, "--test-file", test, "--levels", "4", "--out-dir", tmp_path / "none")
    assert r.returncode != 0 and r.stderr.startswith("no train problems left") and "--levels" in r.stderr
    assert not (tmp_path / "none").exists()
    assert run("math", "--train-file", train, "--levels", "1-3", "--out-dir", out).returncode != 0


def test_math_release_folders(tmp_path):
    def put(split, subject, n, row):
        path = tmp_path / "MATH" / split / subject / f"{n}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=4))  # the release's files are indented, several lines each
        return path

    put("train", "algebra", 10, math_row("A10", r"\boxed{10}"))
    put("train", "algebra", 2, math_row("A2", r"\boxed{2}"))
    put("train", "geometry", 1, {"problem": "G1", "solution": r"\boxed{1}", "level": "Level 4"})  # no "type"
    put("test", "algebra", 5, math_row("T5", r"\boxed{5}"))
    out = tmp_path / "out"
    r = run("math", "--train-file", tmp_path / "MATH" / "train", "--test-file", tmp_path / "MATH" / "test",
            "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert [(x["prompt"], x["answer"], x["subject"]) for x in read(out / "train.jsonl")] == [
        ("A2", "2", "Algebra"), ("A10", "10", "Algebra"), ("G1", "1", "geometry")]  # numeric order; folder as subject
    assert [x["prompt"] for x in read(out / "test.jsonl")] == ["T5"]

    bad = put("train", "algebra", 3, math_row("A3", r"\boxed{3}"))
    bad.write_text('{\n    "problem": "A3",\n    "solution": oops\n}')
    r = run("math", "--train-file", tmp_path / "MATH" / "train", "--out-dir", tmp_path / "out2")
    assert r.returncode != 0 and r.stderr.startswith(f"{bad}:3: not valid JSON")
    assert not (tmp_path / "out2").exists()


# ----------------------------------------------------------------------------------------
# both: seeded splits, malformed lines, no data, the `datasets` path


ROWS = {"gsm8k": lambda i: gsm8k_row(f"Q{i}?", str(i)), "math": lambda i: math_row(f"P{i}?", rf"\boxed{{{i}}}")}


@pytest.mark.parametrize("name", ["gsm8k", "math"])
def test_seeded_split_is_deterministic_and_disjoint(tmp_path, name):
    train = write_jsonl(tmp_path / "train.jsonl", [ROWS[name](i) for i in range(20)])

    def split(seed, out):
        r = run(name, "--train-file", train, "--num-test", 4, "--seed", seed, "--out-dir", tmp_path / out)
        assert r.returncode == 0, r.stderr
        for part, n in [("train", 16), ("test", 4)]:
            assert re.search(rf"{part}\.jsonl: {n} (questions|problems)", r.stdout)
        return [(tmp_path / out / f"{part}.jsonl").read_bytes() for part in ("train", "test")]

    a, b, c = split(1, "a"), split(1, "b"), split(2, "c")
    assert a == b  # same seed, same bytes
    assert a[1] != c[1]  # another seed, another test set
    tr, te = ({json.loads(line)["prompt"] for line in part.decode().splitlines()} for part in a)
    assert len(tr) == 16 and len(te) == 4 and not tr & te
    assert tr | te == {f"{'Q' if name == 'gsm8k' else 'P'}{i}?" for i in range(20)}
    # the default own split is 500, more than this file has: a message naming the flag
    r = run(name, "--train-file", train, "--out-dir", tmp_path / "d")
    assert r.returncode != 0 and "--num-test 500" in r.stderr and "Traceback" not in r.stderr


BAD = [  # (script, line 2 of the train file, what the error says)
    ("gsm8k", '{"question": "Q?", "answer": "#### 3"', "not valid JSON"),
    ("gsm8k", json.dumps({"question": "Q?"}), "missing field 'answer'"),
    ("gsm8k", json.dumps({"question": "Q?", "answer": "It is 3."}), "no final '#### <number>' line"),
    ("gsm8k", json.dumps({"question": "Q?", "answer": "####  "}), "nothing after '####'"),
    ("math", "not json at all", "not valid JSON"),
    ("math", json.dumps({"problem": "P?"}), "missing field 'solution'"),
    ("math", json.dumps({"problem": "P?", "solution": 3}), "field 'solution' must be a string"),
]


@pytest.mark.parametrize("name,line,error", BAD)
@pytest.mark.parametrize("where", ["train", "test"])
def test_malformed_line_names_file_and_line_and_writes_nothing(tmp_path, name, line, error, where):
    good = [json.dumps(ROWS[name](i)) for i in range(3)]
    files = {"train": write_jsonl(tmp_path / "train.jsonl", good), "test": write_jsonl(tmp_path / "test.jsonl", good)}
    write_jsonl(files[where], [good[0], line, good[1]])
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("old\n")
    r = run(name, "--train-file", files["train"], "--test-file", files["test"], "--out-dir", out)
    assert r.returncode != 0
    assert r.stderr.strip() == r.stderr.strip().splitlines()[0]  # one line, no traceback
    assert r.stderr.startswith(f"{files[where]}:2: ") and error in r.stderr
    assert os.listdir(out) == ["train.jsonl"] and (out / "train.jsonl").read_text() == "old\n"


NO_DATASETS = {
    "installed": None,  # this environment as it is
    "missing": "raise ImportError(\"No module named 'datasets'\")\n",
    "offline": "def load_dataset(*args, **kwargs):\n    raise ConnectionError(\"Couldn't reach the Hub\")\n",
}


@pytest.mark.parametrize("kind", list(NO_DATASETS))
@pytest.mark.parametrize("name,start,where", [("gsm8k", "no GSM8K data:", "github.com/openai/grade-school-math"),
                                              ("math", "no MATH data:", "hendrycks/MATH.tar")])
def test_nothing_available_is_one_clear_message(tmp_path, kind, name, start, where):
    if kind == "installed" and importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed here; the fake packages cover the other cases")
    env = fake_datasets(tmp_path, NO_DATASETS[kind]) if NO_DATASETS[kind] else None
    r = run(name, "--out-dir", tmp_path / "out", env=env)
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(start) and where in r.stderr and "--train-file" in r.stderr
    assert ("ConnectionError" in r.stderr) == (kind == "offline")
    assert not (tmp_path / "out").exists()


FAKE_HUB = """import json, os
def load_dataset(path, name=None, **kwargs):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps([path, name]) + "\\n")
    return json.load(open(os.environ["FAKE_DATA"])).get(name or "", {"train": []})
"""


def test_datasets_path(tmp_path):
    env = fake_datasets(tmp_path, FAKE_HUB)
    env["FAKE_LOG"], env["FAKE_DATA"] = str(tmp_path / "log"), str(tmp_path / "data.json")
    (tmp_path / "data.json").write_text(json.dumps({
        "main": {"train": [gsm8k_row("Q?", "1,000")], "test": [gsm8k_row("T?", "2")]},
        "algebra": {"train": [math_row("A?", r"\boxed{x}")], "test": [math_row("AT?", r"\boxed{y}")]},
        "geometry": {"train": [math_row("G?", r"\boxed{\pi}", "Level 3", "Geometry")], "test": []}}))

    r = run("gsm8k", "--out-dir", tmp_path / "g", env=env)
    assert r.returncode == 0, r.stderr
    assert read(tmp_path / "g" / "train.jsonl") == [{"prompt": "Q?", "answer": "1000", "lang": "en"}]
    assert read(tmp_path / "g" / "test.jsonl") == [{"prompt": "T?", "answer": "2", "lang": "en"}]
    assert read(tmp_path / "log") == [["openai/gsm8k", "main"]]

    (tmp_path / "log").unlink()
    r = run("math", "--out-dir", tmp_path / "m", env=env)
    assert r.returncode == 0, r.stderr
    assert read(tmp_path / "log") == [["EleutherAI/hendrycks_math", s] for s in SUBJECTS]  # one config per subject
    assert [(x["prompt"], x["answer"], x["level"]) for x in read(tmp_path / "m" / "train.jsonl")] == [
        ("A?", "x", 1), ("G?", r"\pi", 3)]
    assert [x["prompt"] for x in read(tmp_path / "m" / "test.jsonl")] == ["AT?"]


# ----------------------------------------------------------------------------------------
# code


def fence(code):
    return f"<think>I will write it.</think>\n```python\n{code}\n```\n"


def test_code_tasks_are_well_formed():
    module = load_code_module()
    tasks, prompt = module.TASKS, module.prompt
    assert 20 <= len(tasks) <= 30 and len({t["name"] for t in tasks}) == len(tasks)
    kinds = {t["fn_name"] is None for t in tasks}
    assert kinds == {True, False}  # programs on stdin and functions both
    for t in tasks:
        assert len(t["tests"]) >= 2, t["name"]
        text = prompt(t)
        assert "```python" in text, t["name"]
        if t["fn_name"] is None:
            assert all(set(test) == {"input", "output"} for test in t["tests"]) and "standard input" in text
        else:
            assert all(set(test) == {"fn_name", "args", "expected"} and test["fn_name"] == t["fn_name"]
                       for test in t["tests"])
            assert f"`{t['fn_name']}" in text and "do not read input" in text


def test_code_reference_solutions_pass_every_test():
    tasks = load_code_module().TASKS
    scores = sandbox.code_rewards([fence(t["solution"]) for t in tasks], [t["tests"] for t in tasks])
    assert {t["name"]: s for t, s in zip(tasks, scores) if s != 1.0} == {}


def test_code_wrong_solutions_fail_some_test():
    tasks = load_code_module().TASKS
    silent = "pass"  # prints nothing, defines nothing
    echo = "import sys\nprint(sys.stdin.read())"  # the input back
    first = "def {0}(*args):\n    return args[0] if args else None"  # the first argument back
    completions, tests = [], []
    for t in tasks:
        for code in (silent, echo if t["fn_name"] is None else first.format(t["fn_name"])):
            completions.append(fence(code))
            tests.append(t["tests"])
    scores = sandbox.code_rewards(completions, tests)
    assert [c for c, s in zip(completions, scores) if s >= 1.0] == []


def test_code_prepare_writes_a_seeded_split_the_reward_reads(tmp_path):
    module = load_code_module()
    by_prompt = {module.prompt(t): t for t in module.TASKS}

    def split(seed, out):
        r = run("code", "--num-test", 5, "--seed", seed, "--out-dir", tmp_path / out)
        assert r.returncode == 0, r.stderr
        assert f"train.jsonl: {len(module.TASKS) - 5} tasks" in r.stdout and "test.jsonl: 5 tasks" in r.stdout
        return [(tmp_path / out / f"{part}.jsonl").read_bytes() for part in ("train", "test")]

    a, b, c = split(0, "a"), split(0, "b"), split(1, "c")
    assert a == b and a[1] != c[1]
    text = (a[0] + a[1]).decode()
    assert not [t["name"] for t in module.TASKS if t["solution"] in text]  # reference solutions stay out
    # read as grpo.py and reject_sample.py read prompts: "tests" must be a string field
    train = common.read_jsonl(str(tmp_path / "a" / "train.jsonl"), required=("prompt", "tests"))
    test = common.read_jsonl(str(tmp_path / "a" / "test.jsonl"), required=("prompt", "tests"))
    assert len(test) == 5 and not {x["prompt"] for x in train} & {x["prompt"] for x in test}
    assert {x["prompt"] for x in train + test} == set(by_prompt)
    for x in train + test:
        assert set(x) == {"prompt", "tests", "lang", "_where"} and x["lang"] == "en"
        assert json.loads(x["tests"]) == by_prompt[x["prompt"]]["tests"]
    # the written record scores a reference solution 1 through the reward composition's own function
    assert [rewards.code(fence(by_prompt[x["prompt"]]["solution"]), x) for x in test] == [1.0] * 5
    assert run("code", "--num-test", len(module.TASKS), "--out-dir", tmp_path / "d").returncode != 0
