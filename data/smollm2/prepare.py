"""Two-digit additions asked plainly, for GRPO on a small real model: writes train.jsonl,
dev.jsonl and test.jsonl, no question in two of them (a + b and b + a count as one).

    python data/smollm2/prepare.py                 # 2000 train, 100 dev, 200 test; seed 0

Records are {"prompt": "What is 47 + 85?", "answer": "132"}. SmolLM2-135M-Instruct (its
4-bit GGUF file) gets about one in ten right at temperature 0.6, and three in ten questions
in four tries (docs/smollm2.md): the skill is there, but unreliable, which is what RL can
sharpen. Settings are chosen on dev; test is read once.
"""

import argparse
import json
import os
import random


def questions(num, seed, low=10, high=99):
    """`num` distinct unordered pairs (a, b), a + b asked in a random order."""
    if num > (high - low + 1) * (high - low + 2) // 2:
        raise SystemExit(f"--num-train + --num-dev + --num-test: only {(high - low + 1) * (high - low + 2) // 2} "
                         f"distinct sums of two numbers from {low} to {high}")
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < num:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if (min(a, b), max(a, b)) not in seen:
            seen.add((min(a, b), max(a, b)))
            out.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-train", type=int, default=2000, help="training questions")
    p.add_argument("--num-dev", type=int, default=100, help="questions to pick settings on")
    p.add_argument("--num-test", type=int, default=200, help="held-out questions, for the final evaluation")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = p.parse_args(argv)
    for flag in ("num_train", "num_dev", "num_test"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    qs = questions(args.num_train + args.num_dev + args.num_test, args.seed)
    n1, n2 = args.num_train, args.num_train + args.num_dev
    os.makedirs(args.out, exist_ok=True)
    for name, part in [("train", qs[:n1]), ("dev", qs[n1:n2]), ("test", qs[n2:])]:
        path = os.path.join(args.out, f"{name}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(q) + "\n" for q in part)
        os.replace(path + ".tmp", path)
        print(f"{path}: {len(part)} questions")


if __name__ == "__main__":
    main()
