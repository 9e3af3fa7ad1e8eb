"""The last digit of n + d * k, worked out one addition at a time: the miniature R1's task.

Writes, in --out-dir (this folder by default), with fixed seeds, no question in two files
and none of their questions in the pretraining text:
  train.jsonl       RL prompts            {"prompt", "answer", "lang"}
  test.jsonl        held-out prompts      (the report card is measured on these)
  fresh.jsonl       prompts for rejection sampling, seen by no earlier stage
  cold_start.jsonl  expert traces         {"prompt", "completion", "answer"} in the R1 format
  pretrain.jsonl    pretraining text      {"text"}: the skills, never the procedure

    python data/sums/prepare.py
    python data/sums/prepare.py --max-times 6 --out-dir out/sums6

Why this task: "What is the last digit of 57 + 8 * 5?" in one go asks a model of a
million parameters for a product and a sum at once, which it does not manage. Written out
inside <think> (7+8=15 (4), 5+8=13 (3), ...: add, keep the last digit, count down the
additions left) each step is one fact of the addition table of two digits, and reads only
what lies a fixed distance behind it; a tiny model learns that in a couple of thousand
steps, where looking things up by content takes far more. Answers are integers, checked
by rewards.py.
"""

import argparse
import json
import os
import random


def question(q):
    n, d, k = q
    return f"What is the last digit of {n} + {d} * {k}?"


def trace(q):
    """The expert's completion: add d, k times, keeping only the last digit, counting down
    the additions left. Sums are written with two digits, so every step has the same shape."""
    n, d, k = q
    steps, x = [], n % 10
    for left in range(k - 1, -1, -1):
        steps.append(f"{x}+{d}={x + d:02d} ({left})")
        x = (x + d) % 10
    return f"<think>{', '.join(steps)}.</think> <answer>{x}</answer>"


def answer(q):
    n, d, k = q
    return str((n + d * k) % 10)


def problem(rng, lo, hi):
    """n + d * k: a start 1..99, a step 2..9, and lo..hi additions."""
    return (rng.randint(1, 99), rng.randint(2, 9), rng.randint(lo, hi))


def pretrain_doc(rng, lo, hi):
    """One pretraining document. It teaches the skills (the addition table of two digits,
    the last digit of a number, counting down, reading a question, questions answered in one
    go) but never the additions written out. The tags appear the way markup appears in web text: a note in
    <think> now and then, an answer in <answer> now and then; a few pages (about 6% of the
    questions) happen to have R1's layout."""
    kind = rng.choice(["table", "table", "digit", "count", "read", "question", "question"])
    if kind == "table":  # the addition table of two digits, sums written with two digits
        facts = [f"{x}+{y}={x + y:02d}" for x, y in ((rng.randint(0, 9), rng.randint(2, 9))
                                                    for _ in range(rng.randint(4, 12)))]
        return ", ".join(facts) + "."
    if kind == "digit":
        n = rng.randint(1, 999)
        return f"The last digit of {n} is {n % 10}."
    if kind == "count":  # counting down
        k = rng.randint(1, hi)
        return ", ".join(f"({i})" for i in range(k, -1, -1)) + "."
    q = problem(rng, lo, hi)
    n, d, k = q
    if kind == "read":  # reading a question, without answering it
        return f"{question(q)} It starts at {n % 10}, adds {d}, {k} times."
    note = f"<think>{k} times {d}.</think> " if rng.random() < 0.2 else " "
    ans = f"<answer>{answer(q)}</answer>" if rng.random() < 0.3 else f"{answer(q)}."
    return f"{question(q)}{note}{ans}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min-times", type=int, default=1, help="fewest additions, k")
    p.add_argument("--max-times", type=int, default=9, help="most additions, k")
    p.add_argument("--num-train", type=int, default=2000, help="RL prompts")
    p.add_argument("--num-test", type=int, default=200, help="held-out prompts")
    p.add_argument("--num-fresh", type=int, default=1000, help="prompts for rejection sampling")
    p.add_argument("--num-cold-start", type=int, default=300, help="expert traces (R1: a few thousand)")
    p.add_argument("--num-pretrain", type=int, default=30000, help="pretraining documents")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = p.parse_args()
    if not 1 <= args.min_times <= args.max_times <= 9:
        p.error("--min-times must be at least 1 and at most --max-times, which is at most 9 (one-digit counts)")
    for flag in ["num_train", "num_test", "num_fresh", "num_cold_start", "num_pretrain"]:
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be 0 or more")

    rng = random.Random(args.seed)
    sizes = [("test", args.num_test), ("train", args.num_train), ("fresh", args.num_fresh),
             ("cold_start", args.num_cold_start)]
    need = sum(n for _, n in sizes)
    problems, seen = [], set()
    for _ in range(50 * need):
        if len(problems) == need:
            break
        q = problem(rng, args.min_times, args.max_times)
        if q not in seen:
            seen.add(q)
            problems.append(q)
    if len(problems) < need:
        p.error(f"only {len(problems)} distinct questions; ask for fewer")
    os.makedirs(args.out_dir, exist_ok=True)

    def write(name, records):
        path = os.path.join(args.out_dir, f"{name}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(path + ".tmp", path)
        print(f"{path}: {len(records)} {'documents' if name == 'pretrain' else 'examples'}")

    start = 0
    for name, n in sizes:
        part = problems[start:start + n]
        start += n
        if name == "cold_start":
            write(name, [{"prompt": question(t), "completion": trace(t), "answer": answer(t)} for t in part])
        else:
            write(name, [{"prompt": question(t), "answer": answer(t), "lang": "en"} for t in part])
    asked = {question(t) for t in problems}
    docs = []
    while len(docs) < args.num_pretrain:
        doc = pretrain_doc(rng, args.min_times, args.max_times)
        if doc.split("?")[0] + "?" not in asked:  # no question of any split is in the pretraining text
            docs.append({"text": doc})
    write("pretrain", docs)


if __name__ == "__main__":
    main()
