"""The whole R1 recipe in miniature, on the sums task: one command, offline, on a CPU.

    python data/sums/pipeline.py                   # every stage, about 25 minutes on 2 CPU cores
    python data/sums/pipeline.py --quick           # the same stages, shortened: a smoke test
    python data/sums/pipeline.py --rl-args "--scale none --agg seq-sum"   # Dr. GRPO in both RL stages

Each stage is one command of the project, printed before it runs; its log, checkpoints
and data stay under --out:
  data            data/sums/prepare.py                   -> OUT/data/*.jsonl
  1 base          sft.py --init scratch on pretraining text -> OUT/base (and the smaller OUT/small)
  2 R1-Zero       grpo.py on the base, accuracy + format    -> OUT/zero
  3 cold start    sft.py on the base, a few hundred traces  -> OUT/cold
  4 reasoning RL  grpo.py from the cold-start model         -> OUT/rl
  5 rejection     reject_sample.py from the RL model over fresh prompts -> OUT/kept.jsonl
  6 distillation  the smaller base fine-tuned on the kept samples (OUT/student)
                  and, beside it, on the cold-start traces only (OUT/student-cold)
Every model is then evaluated on the held-out prompts by reject_sample.py (R1's protocol:
temperature 0.6, top-p 0.95, 4 samples per prompt), and the report card is printed
and written to OUT/card.md, OUT/card.json and, when matplotlib is installed, OUT/card.png.

Running it again reuses every stage whose command has not changed since it finished (the
commands are kept in OUT/stages.json); a changed stage runs again, and so does every stage
after it. So changing one flag of the RL stage costs the RL stage and what follows. Only
the commands are compared: after editing the code, run with --fresh.

Deliberate simplifications: one process, stages run one after another; the stage sizes
are fixed in SIZES below (edit them there); the prompts use --template raw, since the
tiny models never saw R1's long instruction and it would triple the cost of each step.
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

# Stage sizes. "full" is the run the README reports; "quick" only checks that every stage runs.
SIZES = {
    "full": dict(num_pretrain=30000, num_train=2000, num_test=200, num_fresh=1000, num_cold_start=300,
                 pretrain_epochs=1, zero_steps=60, cold_epochs=24, rl_steps=100, reject_samples=4,
                 student_epochs=12, eval_samples=4),
    # quick: enough cold start for the format, and enough fresh prompts that some guessed digits
    # are kept whatever the machine's rounding made of the models
    "quick": dict(num_pretrain=2000, num_train=200, num_test=20, num_fresh=100, num_cold_start=60,
                  pretrain_epochs=1, zero_steps=3, cold_epochs=30, rl_steps=3, reject_samples=4,
                  student_epochs=1, eval_samples=2),
}
BASE = ["--hidden", "128", "--layers", "4", "--heads", "4", "--kv-heads", "2", "--mlp", "512"]  # 1.0M parameters
SMALL = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--mlp", "256"]  # the student, 0.15M parameters
MAX_NEW_TOKENS = 128  # the longest expert trace (9 additions) is 113 tokens


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/sums", help="run folder: data, checkpoints, logs, the report card")
    p.add_argument("--quick", action="store_true", help="shortened stages: checks the pipeline, learns little")
    p.add_argument("--device", default="cpu", help="device for every stage: cpu, cuda, auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of every stage")
    p.add_argument("--zero-args", default="", help="extra flags for the R1-Zero grpo.py stage, one quoted string")
    p.add_argument("--rl-args", default="", help="extra flags for both grpo.py stages (R1-Zero and reasoning RL)")
    p.add_argument("--fresh", action="store_true", help="run every stage again, even when its command is unchanged")
    return p.parse_args(argv)


def last_checkpoint(folder):
    """The highest step-NNNNNN folder a training run wrote (a rerun starts from an emptied
    folder, so no older run's checkpoint can be the highest)."""
    steps = sorted(d for d in os.listdir(folder) if d.startswith("step-")) if os.path.isdir(folder) else []
    if not steps:
        raise SystemExit(f"error: {folder} holds no checkpoint; run again with --fresh")
    return os.path.join(folder, steps[-1])


class Stages:
    """Runs commands in order, timing each. A stage whose command is the one recorded when it
    last finished is reused, unless an earlier stage ran again; only the command is compared,
    so after editing the code run with --fresh."""

    def __init__(self, out, fresh):
        self.path = os.path.join(out, "stages.json")
        self.done = {} if fresh or not os.path.exists(self.path) else json.load(open(self.path))
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.changed = False

    def save(self):
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.done, f, indent=2)
        os.replace(self.path + ".tmp", self.path)

    def run(self, name, script, flags, out=None):
        """Run `python script flags` (or reuse it); `out` is the stage's own output folder,
        emptied before it runs. Returns the stage's wall time in seconds."""
        cmd = [sys.executable, os.path.join(ROOT, script)] + [str(f) for f in flags]
        shown = " ".join(shlex.quote(c) for c in ["python", script] + cmd[2:])
        old = self.done.get(name)
        if old and old["command"] == shown and not self.changed:
            print(f"[{name}] unchanged, reused ({old['seconds']:.0f} s when it ran)")
            return old["seconds"]
        if not self.changed and name in self.done:
            # this stage and every one recorded after it are stale from now on, even if this
            # run is stopped before it reaches them
            names = list(self.done)
            self.done = {n: self.done[n] for n in names[:names.index(name)]}
            self.save()
        self.changed = True  # every later stage depends on this one
        if out:
            shutil.rmtree(out, ignore_errors=True)
        print(f"[{name}] {shown}", flush=True)
        log = os.path.join(self.logs, f"{name}.log")
        start = time.time()
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        seconds = time.time() - start
        if proc.returncode:
            tail = open(log).read()[-2000:]
            raise SystemExit(f"{tail}\nerror: stage {name} failed (exit {proc.returncode}); its log is {log}")
        print(f"[{name}] {seconds:.0f} s, log {log}", flush=True)
        self.done[name] = {"command": shown, "seconds": seconds}
        self.save()
        return seconds


def evaluate(stages, name, model, data, out, samples, device, seed):
    """Held-out pass@1, format rate and length of one model: reject_sample.py over the test
    prompts, whose report file is read back."""
    kept = os.path.join(out, "eval", f"{name}.jsonl")
    stages.run(f"eval-{name}", "reject_sample.py", [
        "--model", model, "--data", data, "--template", "raw", "--num-samples", samples,
        "--max-new-tokens", MAX_NEW_TOKENS, "--prompts-per-batch", 50, "--device", device,
        "--seed", seed, "--out", kept, "--overwrite"])
    return json.load(open(os.path.join(out, "eval", f"{name}.report.json")))


def card_lines(rows, total):
    """The report card as a Markdown table."""
    lines = ["| stage | model | held-out pass@1 | format | mean length | train time |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("pass@1") is None:
            lines.append(f"| {r['stage']} | {r['model']} | | | | {r['seconds']:.0f} s |")
        else:
            lines.append(f"| {r['stage']} | {r['model']} | {r['pass@1']:.3f} | {r['format']:.3f} | "
                         f"{r['len']:.1f} | {r['seconds']:.0f} s |")
    lines.append(f"\nwhole pipeline, evaluations included: {total / 60:.1f} min")
    return lines


def plot(rows, path):
    """pass@1 and format rate per stage as a bar chart; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if r.get("pass@1") is not None]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([i - 0.2 for i in x], [r["pass@1"] for r in rows], width=0.4, label="held-out pass@1")
    ax.bar([i + 0.2 for i in x], [r["format"] for r in rows], width=0.4, label="format rate")
    ax.set_xticks(list(x), [r["stage"] for r in rows], rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("nanoR1 in miniature: what each stage bought")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return True


def main(argv=None):
    args = get_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    out, dev, seed = os.path.abspath(args.out), args.device, args.seed
    try:
        rl_args, zero_args = shlex.split(args.rl_args), shlex.split(args.zero_args)
    except ValueError as e:
        raise SystemExit(f"error: --rl-args / --zero-args: {e}") from None
    os.makedirs(out, exist_ok=True)
    stages = Stages(out, args.fresh)
    data = os.path.join(out, "data")
    files = {name: os.path.join(data, f"{name}.jsonl") for name in ["pretrain", "cold_start", "train", "test", "fresh"]}

    def path(sub):
        return os.path.join(out, sub)

    stages.run("data", "data/sums/prepare.py", [
        "--out-dir", data, "--seed", seed, "--num-pretrain", size["num_pretrain"], "--num-train", size["num_train"],
        "--num-test", size["num_test"], "--num-fresh", size["num_fresh"], "--num-cold-start", size["num_cold_start"]])

    sft = ["--template", "raw", "--device", dev, "--seed", seed, "--micro-batch-size", 16, "--val-fraction", 0]
    grpo = ["--template", "raw", "--device", dev, "--seed", seed, "--max-new-tokens", MAX_NEW_TOKENS,
            "--group", 8, "--micro-batch-size", 128, "--beta", 0.04, "--sample-every", 10]
    pretrain = ["--data", files["pretrain"], "--epochs", size["pretrain_epochs"], "--batch-size", 16, "--lr", 3e-3]

    def train(name, script, flags):
        """One training stage writing checkpoints to OUT/name -> (its last checkpoint, seconds)."""
        seconds = stages.run(name, script, [*flags, "--out", path(name)], out=path(name))
        return last_checkpoint(path(name)), seconds

    # 1. base: a fresh model learns the skills from plain text (each text ends in the end token);
    # the smaller base of stage 6 is pretrained here too, so no later change retrains it
    base, t_base = train("base", "sft.py", ["--init", "scratch", *BASE, *pretrain, *sft])
    small, t_small = train("small", "sft.py", ["--init", "scratch", *SMALL, *pretrain, *sft])
    # 2. R1-Zero: RL straight on the base, no supervised data at all
    zero, t_zero = train("zero", "grpo.py", [
        "--model", base, "--data", files["train"], "--rewards", "accuracy,format", "--num-steps", size["zero_steps"],
        *grpo, "--prompts-per-step", 8, "--lr", 2e-4, *rl_args, *zero_args])
    # 3. cold start: the base imitates a few hundred readable expert traces
    cold, t_cold = train("cold", "sft.py", ["--model", base, "--data", files["cold_start"], "--epochs",
                                            size["cold_epochs"], "--batch-size", 16, "--lr", 2e-3, *sft])
    # 4. reasoning RL from the cold-start model. Its samples are drawn at the evaluation's
    # temperature: at 1.0 most samples of this sharp model are wrong for random reasons, and
    # the update then teaches it to be less random rather than to read the question right
    rl, t_rl = train("rl", "grpo.py", [
        "--model", cold, "--data", files["train"], "--rewards", "accuracy,format", "--num-steps", size["rl_steps"],
        *grpo, "--prompts-per-step", 16, "--temperature", 0.6, "--lr", 5e-5, *rl_args])
    # 5. rejection sampling: the RL model answers fresh prompts; one verified answer per prompt is kept
    kept = path("kept.jsonl")
    t_reject = stages.run("reject", "reject_sample.py", [
        "--model", rl, "--data", files["fresh"], "--template", "raw", "--num-samples", size["reject_samples"],
        "--max-new-tokens", MAX_NEW_TOKENS, "--prompts-per-batch", 50, "--keep-per-prompt", 1,
        "--device", dev, "--seed", seed, "--out", kept, "--overwrite"])
    kept_report = json.load(open(path("kept.report.json")))
    if not kept_report["kept"]:
        raise SystemExit(f"error: rejection sampling kept no sample (see {path('kept.report.json')}): "
                         "the RL model answered no fresh prompt right, so there is nothing to distil")
    # 6. distillation: the smaller base fine-tuned on the kept samples, and on the cold-start data alone
    student_flags = ["--model", small, "--epochs", size["student_epochs"], "--batch-size", 16, "--lr", 2e-3, *sft]
    student, t_student = train("student", "sft.py", ["--data", kept, *student_flags])
    student_cold, t_student_cold = train("student-cold", "sft.py", ["--data", files["cold_start"], *student_flags])

    # the report card: every model on the same held-out prompts
    models = [("base", "1 base", base, t_base), ("zero", "2 R1-Zero", zero, t_zero),
              ("cold", "3 cold start", cold, t_cold), ("rl", "4 reasoning RL", rl, t_rl),
              ("small", "6 small base", small, t_small),
              ("student-cold", "6 student, cold-start data", student_cold, t_student_cold),
              ("student", "6 student, distilled", student, t_student)]
    rows = []
    for name, stage, model, seconds in models:
        report = evaluate(stages, name, model, files["test"], out, size["eval_samples"], dev, seed)
        rows.append({"stage": stage, "model": os.path.relpath(model, out), "seconds": seconds,
                     "pass@1": report["pass@1"], "format": report["format"], "len": report["len"]})
        if name == "rl":
            rows.append({"stage": "5 rejection sampling", "seconds": t_reject,
                         "model": f"kept.jsonl: {kept_report['kept']} of {kept_report['samples']} samples"})
    total = sum(stage["seconds"] for stage in stages.done.values())  # a reused stage counts its own run
    lines = card_lines(rows, total)
    print("\n".join(lines))
    with open(path("card.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path("card.md.tmp"), path("card.md"))
    with open(path("card.json.tmp"), "w") as f:
        json.dump({"rows": rows, "minutes": total / 60, "quick": args.quick, "seed": seed}, f, indent=2)
    os.replace(path("card.json.tmp"), path("card.json"))
    print(f"wrote {path('card.md')}, {path('card.json')}" +
          (f" and {path('card.png')}" if plot(rows, path("card.png")) else " (no plot: matplotlib is not installed)"))


if __name__ == "__main__":
    main()
