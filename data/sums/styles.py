"""How a model of the miniature answers, and how often each way of answering is right.

    python data/sums/styles.py --model out/sums/cold/step-000228 --data out/sums/data/fresh.jsonl

Samples --num-samples completions per prompt (R1's protocol by default: temperature 0.6,
top-p 0.95, as the report card) and splits them by style:

  worked   the stepwise working, at least one step such as `7+8=15 (4)`
  terse    `<think>` with no step in it: an answer at once inside the thinking
  at once  no `<think>` at all

For each style: its share of the samples, its pass@1 (rewards.py's accuracy check), and,
for the worked ones, how often the first step starts right: from the last digit of the
question's start, adding its step (what the model has to read off the question). When
this guides a choice of design, use prompts the card does not report (fresh.jsonl).
"""

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import rewards as R  # noqa: E402
from nanor1 import common, models, sampling  # noqa: E402

MAX_NEW_TOKENS = 112  # as pipeline.py's stages
STYLES = ("worked", "terse", "at once")
SUM = re.compile(r"(\d+) \+ (\d) \* \d")
STEP = re.compile(r"(\d)\+(\d)=(\d\d) \((\d)\)")


def style(completion):
    """worked, terse or at once (see the docstring)."""
    if STEP.search(completion):
        return "worked"
    return "terse" if "<think>" in completion else "at once"


def starts_right(prompt, completion):
    """The first step starts from the last digit of the question's start and adds its step."""
    n, d = SUM.search(prompt).groups()
    first = STEP.search(completion)
    return first is not None and first.group(1) == n[-1] and first.group(2) == d


def tally(rows):
    """rows: [(prompt, completion, right)] -> {style: (share, pass@1, share started right or None)}."""
    out = {}
    for s in STYLES:
        mine = [(p, c, ok) for p, c, ok in rows if style(c) == s]
        if mine:
            read = sum(starts_right(p, c) for p, c, _ in mine) / len(mine) if s == "worked" else None
            out[s] = (len(mine) / len(rows), sum(ok for *_, ok in mine) / len(mine), read)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--data", required=True, help="jsonl of {prompt, answer}")
    p.add_argument("--max-prompts", type=int, default=200, help="use the first N prompts")
    p.add_argument("--num-samples", type=int, default=4, help="completions per prompt")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="completion length limit, tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = p.parse_args()
    common.check_ranges(p, args, at_least_1=["max_prompts", "num_samples", "max_new_tokens"],
                        at_least_0=["temperature"])
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be above 0 and at most 1")
    try:
        examples = common.read_jsonl(args.data, required=("prompt", "answer"))[: args.max_prompts]
        for ex in examples:
            if not isinstance(ex["prompt"], str) or not SUM.search(ex["prompt"]):
                raise common.UserError(f"{ex['_where']}: not a question of the sums task (n + d * k)")
        model, tok = models.load_model(args.model)
        eos = models.eos_ids(model, tok)
    except common.UserError as e:
        raise SystemExit(f"error: {e}")
    model.eval()
    prompt_ids = [common.encode_prompt(ex["prompt"], tok, "raw") for ex in examples]
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for s in range(0, len(examples), 50):
        out = sampling.rollout(model, tok, examples[s:s + 50], prompt_ids[s:s + 50], args.num_samples,
                               args.max_new_tokens, args.temperature, args.top_p, eos,
                               R.scorer("accuracy"), gen, {})
        rows += [(r["example"]["prompt"], r["text"], r["parts"]["accuracy"] == 1.0) for r in out]
    print(f"{len(rows)} samples from {len(examples)} prompts of {args.data}, temperature {args.temperature}")
    for s, (share, acc, read) in tally(rows).items():
        extra = f", first step starts right {read:.2f}" if read is not None else ""
        print(f"{s:8s} share {share:.2f}, pass@1 {acc:.2f}{extra}")


if __name__ == "__main__":
    main()
