"""GSM8K grade-school word problems (Cobbe et al. 2021): writes train.jsonl and test.jsonl.

Records are {"prompt": question, "answer": "1234", "lang": "en"}: the answer is the number on
GSM8K's last "#### " line, thousands commas removed, so rewards.py compares numbers only.

    python data/gsm8k/prepare.py --train-file train.jsonl --test-file test.jsonl
    python data/gsm8k/prepare.py --train-file train.jsonl --num-test 500 --seed 0   # own test split
    python data/gsm8k/prepare.py        # through the `datasets` package (its cache, or the network)

The files are grade_school_math/data/train.jsonl and test.jsonl of
https://github.com/openai/grade-school-math (7473 and 1319 questions); the parquet files of
https://huggingface.co/datasets/openai/gsm8k (main/) also work if pandas and pyarrow are
installed. Nothing is written unless every record parses: a bad line is one error naming file:line.
"""

import argparse
import json
import os
import random
import sys

HUB_ID = "openai/gsm8k"
HOW_TO_GET = ("no GSM8K data: pass --train-file (and --test-file) with grade_school_math/data/train.jsonl and "
              "test.jsonl from https://github.com/openai/grade-school-math (or main/*.parquet from "
              f"https://huggingface.co/datasets/{HUB_ID}), or install `datasets` and run once online to cache {HUB_ID}")


def read_rows(path):
    """[(where, row)] of a jsonl (or parquet) file; where is "file:line", for error messages."""
    if path.endswith(".parquet"):
        try:
            import pandas  # optional, and only for parquet
        except ImportError:
            sys.exit(f"{path}: reading parquet needs pandas and pyarrow; install them or use the jsonl files")
        return [(f"{path}:row {i + 1}", row) for i, row in enumerate(pandas.read_parquet(path).to_dict("records"))]
    if not os.path.isfile(path):
        sys.exit(f"{path}: no such file")
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


def load_hub():
    """(train rows, test rows) through `datasets`, imported only here: it is optional."""
    try:
        import datasets
    except ImportError:
        sys.exit(HOW_TO_GET)
    try:
        ds = datasets.load_dataset(HUB_ID, "main")
    except Exception as e:  # offline, not cached, hub down: all mean "not available here"
        sys.exit(f"{HOW_TO_GET} (datasets could not load it: {type(e).__name__}: {str(e).strip()[:200]})")
    return [[(f"{HUB_ID}:{split}:{i + 1}", row) for i, row in enumerate(ds[split])] for split in ("train", "test")]


def parse(where, row):
    """One GSM8K row -> our record; a row we cannot read stops the script, naming its line."""
    if not isinstance(row, dict):
        sys.exit(f"{where}: expected a JSON object with 'question' and 'answer'")
    for key in ("question", "answer"):
        if key not in row:
            sys.exit(f"{where}: missing field '{key}'")
        if not isinstance(row[key], str):
            sys.exit(f"{where}: field '{key}' must be a string, not {type(row[key]).__name__}")
    if "####" not in row["answer"]:
        sys.exit(f"{where}: the answer has no final '#### <number>' line")
    answer = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")  # "#### 1,234" -> "1234"
    if not answer:
        sys.exit(f"{where}: nothing after '####'")
    return {"prompt": row["question"].strip(), "answer": answer, "lang": "en"}


def split(train, test, num_test, seed):
    """The official test set (all of it, or a seeded sample of num_test), else a seeded split of
    train. Picks keep their original order, so a changed seed is the only thing that moves them."""
    rng = random.Random(seed)
    pool = train if test is None else test
    n = (500 if test is None else len(test)) if num_test is None else num_test
    if not 0 < n <= len(pool) - (test is None):  # an own split must leave some training questions
        sys.exit(f"--num-test {n}: needs between 1 and {len(pool) - (test is None)} (there are {len(pool)} questions)")
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
        print(f"{path}: {len(records)} questions")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-file", default=None, help="GSM8K train.jsonl (or .parquet); none: load through `datasets`")
    p.add_argument("--test-file", default=None, help="GSM8K test.jsonl (or .parquet); none: a seeded split of the train file")
    p.add_argument("--num-test", type=int, default=None,
                   help="test questions: default all of --test-file, or 500 split off the train file")
    p.add_argument("--seed", type=int, default=0, help="random seed of the test split or sample")
    p.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = p.parse_args()
    if args.test_file and not args.train_file:
        p.error("--test-file needs --train-file")

    if args.train_file:
        train_rows = read_rows(args.train_file)
        test_rows = read_rows(args.test_file) if args.test_file else None
    else:
        train_rows, test_rows = load_hub()
    train = [parse(w, r) for w, r in train_rows]
    test = [parse(w, r) for w, r in test_rows] if test_rows is not None else None
    train, test = split(train, test, args.num_test, args.seed)
    overlap = {r["prompt"] for r in train} & {r["prompt"] for r in test}
    if overlap:  # duplicates in the source: worth knowing before trusting a test score
        print(f"note: {len(overlap)} test questions also appear in train")
    write(args.out_dir, [("train", train), ("test", test)])


if __name__ == "__main__":
    main()
