"""A small example set of addition questions, for smoke runs: writes train.jsonl and test.jsonl.

    python data/example/prepare.py            # 200 train / 50 test, seed 0

The real tasks (a synthetic reasoning set, GSM8K, MATH, code) get their own folders.
"""

import argparse
import json
import os
import random

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--num-train", type=int, default=200, help="training questions")
p.add_argument("--num-test", type=int, default=50, help="held-out questions")
p.add_argument("--seed", type=int, default=0, help="random seed")
args = p.parse_args()

rng = random.Random(args.seed)
pairs = set()
while len(pairs) < args.num_train + args.num_test:
    pairs.add((rng.randint(0, 99), rng.randint(0, 99)))
pairs = sorted(pairs)
rng.shuffle(pairs)
here = os.path.dirname(os.path.abspath(__file__))
for name, part in [("train", pairs[:args.num_train]), ("test", pairs[args.num_train:])]:
    path = os.path.join(here, f"{name}.jsonl")
    with open(path, "w") as f:
        for a, b in part:
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    print(f"{path}: {len(part)} questions")
