"""Two-digit numbers times a digit, and a cold start for them written by a program: writes
test.jsonl, dev.jsonl and train.jsonl (questions, no product in two of them) and
cold_start.jsonl (worked answers in R1's format to the first training questions).

    python data/smollm2_r1/prepare.py          # 100 test, 100 dev, 520 train, 300 of them worked; seed 0

Questions are {"prompt": "What is 47 * 8?", "answer": "376"}, asked plainly, no
instruction: all 720 products of 10..99 by 2..9, shuffled. SmolLM2-135M-Instruct as
shipped answers about one in ten right (docs/smollm2.md). A cold-start line adds an answer
a person could write, in R1's format, in one of two styles taken in turn:

    terse                      careful
    <think>                    <think>
    47 * 8 = 376               I split 47 into 40 and 7.
    </think>                   40 * 8 = 320
    <answer>376</answer>       7 * 8 = 56
                               320 + 56 = 376
                               </think>
                               <answer>376</answer>

The terse style asks the model for the product in its head, which it often gets wrong; the
careful one only for a line of the times table and a sum whose ones carry nothing. The
cold start imitates both, so the model learns R1's format and both ways of thinking;
which way pays is left to reinforcement learning to find out.

sft.py trains on {"prompt", "completion"} under the model's chat template (--template chat).
Settings are chosen on dev; test is read once.
"""

import argparse
import json
import os
import random


def questions(seed, low=10, high=99, digits=range(2, 10)):
    """Every product of a two-digit number by a digit from 2 to 9, shuffled: 720 questions."""
    pairs = [(a, b) for a in range(low, high + 1) for b in digits]
    random.Random(seed).shuffle(pairs)
    return pairs


def worked(a, b, careful):
    """The cold-start answer. Terse: the product at once. Careful: the tens and the ones
    multiplied apart, then the two products added."""
    tens, ones = a // 10 * 10, a % 10
    lines = [f"I split {a} into {tens} and {ones}.", f"{tens} * {b} = {tens * b}", f"{ones} * {b} = {ones * b}",
             f"{tens * b} + {ones * b} = {a * b}"] if careful else [f"{a} * {b} = {a * b}"]
    return "<think>\n" + "\n".join(lines) + f"\n</think>\n<answer>{a * b}</answer>"


def record(a, b, careful=None):
    """A question; with careful True or False also its worked answer, in that style."""
    r = {"prompt": f"What is {a} * {b}?", "answer": str(a * b)}
    return r if careful is None else {**r, "completion": worked(a, b, careful)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-dev", type=int, default=100, help="questions to pick settings on")
    p.add_argument("--num-test", type=int, default=100, help="held-out questions, for the final evaluation")
    p.add_argument("--num-cold-start", type=int, default=300,
                   help="training questions that also get a worked answer, for the cold-start SFT")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = p.parse_args(argv)
    pairs = questions(args.seed)
    train = len(pairs) - args.num_dev - args.num_test
    if min(args.num_dev, args.num_test, args.num_cold_start) < 1:
        p.error("--num-dev, --num-test and --num-cold-start must be at least 1")
    if args.num_cold_start > train:
        p.error(f"--num-dev and --num-test leave {train} of the {len(pairs)} questions for training: "
                f"--num-cold-start must be at most {train}")
    parts = {"test": [record(a, b) for a, b in pairs[:args.num_test]],
             "dev": [record(a, b) for a, b in pairs[args.num_test:args.num_test + args.num_dev]],
             "train": [record(a, b) for a, b in pairs[-train:]],
             # the first training questions, terse and careful in turn
             "cold_start": [record(a, b, careful=i % 2 == 1)
                            for i, (a, b) in enumerate(pairs[-train:][:args.num_cold_start])]}
    os.makedirs(args.out, exist_ok=True)
    for name, rows in parts.items():
        path = os.path.join(args.out, f"{name}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
        print(f"{path}: {len(rows)} {'worked answers' if name == 'cold_start' else 'questions'}")


if __name__ == "__main__":
    main()
