"""The arithmetic alone: how often a model completes "47 + 85 =" with the right sum, given
the question under its chat template and that start of an answer, greedily, in float32.

    python data/smollm2/probe.py --model SmolLM2-135M-Instruct.Q4_1.gguf --data out/smollm2/data/test.jsonl
    python data/smollm2/probe.py --model out/smollm2/grpo/step-000060 --data out/smollm2/data/test.jsonl

GRPO's accuracy reward mixes two skills: answering with the sum at all (rather than an
essay that ends on another number) and adding right. This probe takes the first away: the
answer is started for the model, so only the adding is left. If the trained model's
score here is the base's, RL taught it to answer plainly; if it is higher, it also taught
it to add. Prints one line of JSON, {"model", "questions", "right"}, and writes it to --out.
"""

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from nanor1 import common, models, sampling  # noqa: E402

QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the model: a GGUF file's name or path, a checkpoint folder, ...")
    p.add_argument("--data", required=True, help="questions from data/smollm2/prepare.py, jsonl")
    p.add_argument("--batch", type=int, default=50, help="questions decoded together")
    p.add_argument("--out", default=None, help="also write the result here, a JSON file")
    args = p.parse_args(argv)
    try:
        rows = common.read_jsonl(args.data, required=("prompt", "answer"))
        pairs = []
        for r in rows:
            m = QUESTION.fullmatch(r["prompt"])
            if not m or not r["answer"].isdigit():
                raise common.UserError(f"{r['_where']}: not a question and answer of data/smollm2/prepare.py")
            pairs.append((m.group(1), m.group(2), int(r["answer"])))
        model, tok = models.load_model(args.model)
    except common.UserError as e:
        sys.exit(f"error: {e}")
    # the chat prompt, then the answer's start as the model's own text: "47 + 85 ="
    start = [tok(f"{a} + {b} =", add_special_tokens=False)["input_ids"] for a, b, _ in pairs]
    prompts = [common.encode_prompt(r["prompt"], tok, "chat") + ids for r, ids in zip(rows, start)]
    right = 0
    for s in range(0, len(prompts), args.batch):
        out = sampling.sample(model, prompts[s:s + args.batch], 1, 4, models.eos_ids(model, tok), tok.pad_token_id,
                              temperature=0, vocab=len(tok))
        for ids, (_, _, total) in zip(out["ids"].tolist(), pairs[s:s + args.batch]):
            number = re.match(r"\s*(\d+)", tok.decode(ids, skip_special_tokens=True))
            right += bool(number) and int(number.group(1)) == total
    result = json.dumps({"model": args.model, "questions": len(pairs), "right": right / len(pairs)})
    print(result)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(result + "\n")
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
