r"""The MATH competition problems (Hendrycks et al. 2021): writes train.jsonl and test.jsonl.

Records are {"prompt": problem, "answer", "lang": "en", "level": 1-5 or null, "subject"}: the
answer is the content of the solution's last \boxed{...} (the grader's find_boxes, braces balanced).
A solution without a box is skipped and counted, not an error.

    python data/math/prepare.py --train-file MATH/train --test-file MATH/test     # the release's folders
    python data/math/prepare.py --train-file train.jsonl --test-file test.jsonl --levels 1,2,3
    python data/math/prepare.py --train-file train.jsonl --num-test 500 --seed 0  # own test split
    python data/math/prepare.py        # through the `datasets` package (its cache, or the network)

Sources: the release https://people.eecs.berkeley.edu/~hendrycks/MATH.tar (folders
train/<subject>/<n>.json and test/<subject>/<n>.json), or jsonl with "problem", "solution" and
optional "level", "type"/"subject". MATH-500 is a fixed subset chosen by OpenAI, not a seeded
sample: for it, pass math_splits/test.jsonl of https://github.com/openai/prm800k as --test-file
(and its train.jsonl, the other 12,000 problems, as --train-file). On the hub, the default id
has one config per subject; --hub-configs lists them ('' for a data set without configs).
"""

import argparse
import glob
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanor1.grader import find_boxes  # noqa: E402  the grader's own box reader, so data and grading agree

SUBJECTS = "algebra,counting_and_probability,geometry,intermediate_algebra,number_theory,prealgebra,precalculus"
HOW_TO_GET = ("no MATH data: pass --train-file and --test-file, either the train/ and test/ folders of "
              "https://people.eecs.berkeley.edu/~hendrycks/MATH.tar or jsonl files such as math_splits/train.jsonl "
              "and test.jsonl of https://github.com/openai/prm800k, or install `datasets` and run once online "
              "to cache --hub-id")


def read_rows(path):
    """[(where, row)] of a jsonl file, or of a folder of <subject>/<n>.json; where names file:line."""
    if os.path.isdir(path):
        # by subject, then by number: the shorter name first puts 2.json before 10.json
        files = sorted(glob.glob(os.path.join(path, "*", "*.json")),
                       key=lambda f: (os.path.dirname(f), len(os.path.basename(f)), f))
        if not files:
            sys.exit(f"{path}: no <subject>/<n>.json files here (for the release pass MATH/train and MATH/test)")
        rows = []
        for file in files:
            try:
                with open(file, "rb") as f:
                    row = json.load(f)
            except ValueError as e:
                sys.exit(f"{file}:{getattr(e, 'lineno', 1)}: not valid JSON ({getattr(e, 'msg', e)})")
            if isinstance(row, dict):
                row.setdefault("type", os.path.basename(os.path.dirname(file)))  # the folder is the subject
            rows.append((f"{file}:1", row))
        return rows
    if not os.path.isfile(path):
        sys.exit(f"{path}: no such file or folder")
    rows = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{n}", json.loads(line.rstrip(b"\r\n"))))  # bytes: a BOM or bad UTF-8 too
            except ValueError as e:  # a JSONDecodeError has a column; bad UTF-8 has none
                sys.exit(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', e)}"
                         + (f" at column {e.colno})" if hasattr(e, "colno") else ")"))
    if not rows:
        sys.exit(f"{path}: no records")
    return rows


def load_hub(hub_id, configs):
    """(train rows, test rows or None) through `datasets`, imported only here: it is optional."""
    try:
        import datasets
    except ImportError:
        sys.exit(HOW_TO_GET)
    train, test = [], []
    for config in configs.split(",") if configs else [None]:
        try:
            ds = datasets.load_dataset(hub_id, config)
        except Exception as e:  # offline, not cached, hub down: all mean "not available here"
            sys.exit(f"{HOW_TO_GET} (datasets could not load {hub_id} {config or ''}: {type(e).__name__}: "
                     f"{str(e).strip()[:200]})")
        for split, rows in [("train", train), ("test", test)]:
            if split in ds:
                rows += [(f"{hub_id}/{config or ''}:{split}:{i + 1}", r) for i, r in enumerate(ds[split])]
    return train, test or None


def parse(where, row):
    """One MATH row -> our record, its answer "" when the solution has no box."""
    if not isinstance(row, dict):
        sys.exit(f"{where}: expected a JSON object with 'problem' and 'solution'")
    for key in ("problem", "solution"):
        if key not in row:
            sys.exit(f"{where}: missing field '{key}'")
        if not isinstance(row[key], str):
            sys.exit(f"{where}: field '{key}' must be a string, not {type(row[key]).__name__}")
    boxes = find_boxes(row["solution"])  # [(start, end, content)] of outermost boxes; unbalanced ones skipped
    level = re.search(r"\d+", str(row.get("level", "")))  # "Level 3" (release), 3 (prm800k); "Level ?" -> None
    return {"prompt": row["problem"].strip(), "answer": boxes[-1][2].strip() if boxes else "", "lang": "en",
            "level": int(level.group()) if level else None, "subject": row.get("type") or row.get("subject")}


def keep(name, rows, levels):
    """Parsed records with a boxed answer and, if levels is given, a level in it; counts printed."""
    records = [parse(w, r) for w, r in rows]
    boxed = [r for r in records if r["answer"]]
    kept = [r for r in boxed if levels is None or r["level"] in levels]
    print(f"{name}: {len(records)} problems, {len(records) - len(boxed)} without a \\boxed answer (skipped), "
          f"{len(boxed) - len(kept)} outside --levels")
    return kept


def split(train, test, num_test, seed):
    """The official test set (all of it, or a seeded sample of num_test), else a seeded split of
    train. Picks keep their original order, so a changed seed is the only thing that moves them."""
    rng = random.Random(seed)
    pool = train if test is None else test
    n = (500 if test is None else len(test)) if num_test is None else num_test
    if not 0 < n <= len(pool) - (test is None):  # an own split must leave some training problems
        sys.exit(f"--num-test {n}: needs between 1 and {len(pool) - (test is None)} (there are {len(pool)} problems)")
    picked = set(rng.sample(range(len(pool)), n))
    held = [r for i, r in enumerate(pool) if i in picked]
    if test is None:
        train = [r for i, r in enumerate(train) if i not in picked]
    return train, held


def write(out_dir, parts):
    """Every file to a temporary name first; the renames come only once all are written."""
    os.makedirs(out_dir, exist_ok=True)
    for name, records in parts:
        with open(os.path.join(out_dir, f"{name}.jsonl.tmp"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    for name, records in parts:
        path = os.path.join(out_dir, f"{name}.jsonl")
        os.replace(path + ".tmp", path)
        print(f"{path}: {len(records)} problems")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-file", default=None, help="jsonl, or the release's MATH/train folder; none: `datasets`")
    p.add_argument("--test-file", default=None, help="jsonl, or MATH/test; none: a seeded split of the train file")
    p.add_argument("--num-test", type=int, default=None,
                   help="test problems: default all of --test-file (e.g. 500 for a MATH-500-sized sample), "
                        "or 500 split off the train file")
    p.add_argument("--seed", type=int, default=0, help="random seed of the test split or sample")
    p.add_argument("--levels", default=None, help="keep only these difficulty levels, e.g. 1,2,3 (default: all)")
    p.add_argument("--hub-id", default="EleutherAI/hendrycks_math", help="`datasets` id, used without --train-file")
    p.add_argument("--hub-configs", default=SUBJECTS, help="comma list of the hub id's configs, '' for none")
    p.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = p.parse_args()
    if args.test_file and not args.train_file:
        p.error("--test-file needs --train-file")
    if args.levels is not None and not re.fullmatch(r"\d+(,\d+)*", args.levels):
        p.error(f"--levels {args.levels!r}: expected a comma list of numbers such as 1,2,3")
    levels = {int(x) for x in args.levels.split(",")} if args.levels else None

    if args.train_file:
        train_rows = read_rows(args.train_file)
        test_rows = read_rows(args.test_file) if args.test_file else None
    else:
        train_rows, test_rows = load_hub(args.hub_id, args.hub_configs)
    train = keep("train", train_rows, levels)
    test = keep("test", test_rows, levels) if test_rows is not None else None
    for name, records in [("train", train), ("test", test)]:
        if records == []:  # an empty file would only fail later, in grpo.py
            sys.exit(f"no {name} problems left: none has a \\boxed answer{' and a level in --levels' if levels else ''}")
    train, test = split(train, test, args.num_test, args.seed)
    overlap = {r["prompt"] for r in train} & {r["prompt"] for r in test}
    if overlap:  # duplicates in the source: worth knowing before trusting a test score
        print(f"note: {len(overlap)} test problems also appear in train")
    write(args.out_dir, [("train", train), ("test", test)])


if __name__ == "__main__":
    main()
