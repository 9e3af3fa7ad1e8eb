"""The last digit of n + d * k, worked out one addition at a time: the miniature R1's task.

Writes, in --out-dir (this folder by default), with fixed seeds; no question is in two of
the question files:
  train.jsonl       RL prompts            {"prompt", "answer", "lang"}
  test.jsonl        held-out prompts      (the report card is measured on these)
  fresh.jsonl       prompts for rejection sampling, seen by no earlier stage
  cold_start.jsonl  expert traces         {"prompt", "completion", "answer"} in the R1 format,
                    half worked out stepwise, half answered at once (--terse)
  mid.jsonl         mid-training          {"prompt", "completion"}: questions answered as most
                    pages answer them, half worked out stepwise (--mid-worked)
  pretrain.jsonl    pretraining text      {"text"}: the skills, and exercises of the procedure
                    under their heading; no question, and no held-out sum

    python data/sums/prepare.py
    python data/sums/prepare.py --max-times 9 --out-dir out/sums9

Why this task: "What is the last digit of 57 + 8 * 5?" in one go asks a model of a
million parameters for a product and a sum at once, which it does not manage. Written out
inside <think> (57 + 8 * 5: 7+8=15 (4), 5+8=13 (3), ...: copy the sum, then add, keep the
last digit, count down the additions left) each step is one fact of the addition table of
two digits, and reads only what lies a fixed distance behind it; the digit after the last
step is the answer, so an answer that does not follow from the working is rare and a
guess stops paying. Answers
are integers, checked by rewards.py.
"""

import argparse
import json
import os
import random


def question(q):
    n, d, k = q
    return f"What is the last digit of {n} + {d} * {k}?"


def drill(q):
    """The procedure as a textbook prints it: the sum, then d added k times, keeping only the
    last digit and counting down the additions left; the digit after the last step is the
    answer. Sums are written with two digits, so every step has the same shape and reads only
    what lies a fixed distance behind it."""
    n, d, k = q
    steps, x = [], n % 10
    for left in range(k - 1, -1, -1):
        steps.append(f"{x}+{d}={x + d:02d} ({left})")
        x = (x + d) % 10
    return f"{n} + {d} * {k}: {', '.join(steps)}, {x}."


def trace(q):
    """The stepwise expert: the drill inside <think> (copying the sum from the question first),
    the answer restated in <answer>."""
    return f"<think>{drill(q)}</think> <answer>{answer(q)}</answer>"


def answer(q):
    n, d, k = q
    return str((n + d * k) % 10)


def problem(rng, lo, hi):
    """n + d * k: a start 1..99, a step 2..9, and lo..hi additions."""
    return (rng.randint(1, 99), rng.randint(2, 9), rng.randint(lo, hi))


def terse(q):
    """The other expert's completion: the answer at once, as someone who can do it in their
    head writes it. As right as the stepwise trace, but it shows no working to follow."""
    n, d, k = q
    x = answer(q)
    return f"<think>{n} + {d} * {k} ends in {x}.</think> <answer>{x}</answer>"


def one_go(rng, q):
    """An answer as most pages give it: at once, now and then with a short note in <think>,
    now and then inside <answer>."""
    _, d, k = q
    note = f"<think>{k} times {d}.</think> " if rng.random() < 0.2 else " "
    ans = f"<answer>{answer(q)}</answer>" if rng.random() < 0.3 else f"{answer(q)}."
    return note + ans


def pretrain_doc(rng, lo, hi):
    """One pretraining document: the skills (the last digit of a number, counting down) and
    exercises of the procedure as a textbook prints them, a sum worked out stepwise under its
    heading, with no question and no tags. The steps teach the addition table of two digits;
    copying the heading teaches the model to read a sum it was given.
    -> (the text, the sum it works out or None)."""
    kind = rng.choice(["drill", "drill", "digit", "count"])
    if kind == "digit":
        n = rng.randint(1, 999)
        return f"The last digit of {n} is {n % 10}.", None
    if kind == "count":  # counting down
        k = rng.randint(1, hi)
        return ", ".join(f"({i})" for i in range(k, -1, -1)) + ".", None
    q = problem(rng, lo, hi)
    n, d, k = q
    return f"Work out {n} + {d} * {k}. {drill(q)}", q


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min-times", type=int, default=1, help="fewest additions, k")
    p.add_argument("--max-times", type=int, default=7, help="most additions, k")
    p.add_argument("--num-train", type=int, default=2000, help="RL prompts")
    p.add_argument("--num-test", type=int, default=200, help="held-out prompts")
    p.add_argument("--num-fresh", type=int, default=1000, help="prompts for rejection sampling")
    p.add_argument("--num-cold-start", type=int, default=300, help="expert traces (R1: a few thousand)")
    p.add_argument("--num-pretrain", type=int, default=30000, help="pretraining documents")
    p.add_argument("--terse", type=float, default=0.5, help="share of the expert traces that answer at once")
    p.add_argument("--num-mid", type=int, default=2000, help="mid-training questions with their answers")
    p.add_argument("--mid-worked", type=float, default=0.5,
                   help="share of the mid-training answers worked out stepwise")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = p.parse_args()
    if not 1 <= args.min_times <= args.max_times <= 9:
        p.error("--min-times must be at least 1 and at most --max-times, which is at most 9 (one-digit counts)")
    for flag in ["num_train", "num_test", "num_fresh", "num_cold_start", "num_pretrain", "num_mid"]:
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be 0 or more")
    for flag in ["terse", "mid_worked"]:
        if not 0 <= getattr(args, flag) <= 1:
            p.error(f"--{flag.replace('_', '-')} must be a share, from 0 to 1")

    rng = random.Random(args.seed)
    sizes = [("test", args.num_test), ("train", args.num_train), ("fresh", args.num_fresh),
             ("cold_start", args.num_cold_start), ("mid", args.num_mid)]
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
        if name == "mid":
            write(name, [{"prompt": question(t), "completion": trace(t) if rng.random() < args.mid_worked
                          else one_go(rng, t)} for t in part])
        elif name == "cold_start":
            write(name, [{"prompt": question(t), "completion": terse(t) if i < args.terse * n else trace(t),
                          "answer": answer(t)} for i, t in enumerate(part)])
        else:
            write(name, [{"prompt": question(t), "answer": answer(t), "lang": "en"} for t in part])
    held_out = set(problems[:args.num_test])
    docs = []
    while len(docs) < args.num_pretrain:
        doc, q = pretrain_doc(rng, args.min_times, args.max_times)
        if q not in held_out:  # no held-out sum is worked out anywhere before the card measures it
            docs.append({"text": doc})
    write("pretrain", docs)


if __name__ == "__main__":
    main()
