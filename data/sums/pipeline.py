"""The whole R1 recipe in miniature, on the sums task: one command, offline, on a CPU.

    python data/sums/pipeline.py                   # every stage, about 13 minutes on 2 CPU cores
    python data/sums/pipeline.py --quick           # the same stages, shortened: a smoke test
    python data/sums/pipeline.py --rl-args "--scale none --agg seq-sum"   # Dr. GRPO in every RL stage

Each stage is one command of the project, printed before it runs; its log, checkpoints
and data stay under --out:
  data            data/sums/prepare.py                      -> OUT/data/*.jsonl
  1 base          sft.py --init scratch on pretraining text -> OUT/pretrain, then a short
                  mid-training on answered questions        -> OUT/base (and the smaller OUT/small)
  2 R1-Zero       grpo.py on the base, accuracy + format    -> OUT/zero
  3 cold start    sft.py on the base, a few hundred traces  -> OUT/cold
  4 reasoning RL  grpo.py from the cold-start model         -> OUT/rl
  5 rejection     reject_sample.py from the RL model over fresh prompts -> OUT/kept.jsonl
  6 SFT           the base fine-tuned on the kept samples   -> OUT/rs
  7 second RL     grpo.py from that model                   -> OUT/rl2
  8 distillation  the smaller base fine-tuned on the kept samples (OUT/student)
                  and, beside it, on the cold-start traces only (OUT/student-cold)
Every model is then evaluated on the held-out prompts by reject_sample.py (R1's protocol:
temperature 0.6, top-p 0.95, 4 samples per prompt), and the report card is printed
and written to OUT/card.md, OUT/card.json and, when matplotlib is installed, OUT/card.png
(the bars, and the RL stages' held-out pass@1 and length over their steps); a --quick
card says on its first line, and its picture in its title, that it is a smoke test. To see why a
model scores what it scores, data/sums/styles.py splits its answers into worked out,
terse and at once, each with its pass@1.

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
    "full": dict(num_pretrain=30000, num_mid=2000, num_train=2000, num_test=200, num_fresh=1000, num_cold_start=300,
                 pretrain_epochs=2, small_epochs=0.5, mid_epochs=6, zero_steps=40, cold_epochs=12,
                 rl_steps=40, rl2_steps=15, reject_samples=4, rs_epochs=4, student_epochs=12,
                 eval_samples=4, curve_every=10, curve_prompts=100),
    # quick: enough cold start for the format, and enough fresh prompts that some guessed digits
    # are kept whatever the machine's rounding made of the models
    "quick": dict(num_pretrain=2000, num_mid=200, num_train=200, num_test=20, num_fresh=100,
                  num_cold_start=60, pretrain_epochs=1, small_epochs=1, mid_epochs=1, zero_steps=3,
                  cold_epochs=30, rl_steps=3, rl2_steps=2, reject_samples=4, rs_epochs=1,
                  student_epochs=1, eval_samples=2, curve_every=2, curve_prompts=10),
}
BASE = ["--hidden", "128", "--layers", "4", "--heads", "4", "--kv-heads", "2", "--mlp", "512"]  # 1.0M parameters
# the student, 0.15M parameters
SMALL = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--mlp", "256"]
# the first line of a --quick run's card and its picture's title: its numbers measure nothing
SMOKE = (f"smoke test (--quick): every stage runs; on {SIZES['quick']['num_test']} prompts x "
         f"{SIZES['quick']['eval_samples']} samples these numbers are noise, not a result")
MAX_NEW_TOKENS = 112  # the longest expert trace (7 additions) is 102 tokens
GUESS = 0.1  # pass@1 of guessing a digit


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/sums", help="run folder: data, checkpoints, logs, the report card")
    p.add_argument("--quick", action="store_true", help="shortened stages: checks the pipeline, learns little")
    p.add_argument("--device", default="cpu", help="device for every stage: cpu, cuda, auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of every stage")
    p.add_argument("--zero-args", default="", help="extra flags for the R1-Zero grpo.py stage, one quoted string")
    p.add_argument("--rl-args", default="",
                   help="extra flags for every grpo.py stage (R1-Zero, reasoning RL, second RL)")
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


def card_lines(rows, curves, total, quick=False):
    """The report card as Markdown: a table of the stages, then the RL stages' curves; a
    --quick card says first that it is a smoke test."""
    lines = [SMOKE, ""] if quick else []
    lines += ["| stage | model | held-out pass@1 | format | mean length | train time |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("pass@1") is None:
            lines.append(f"| {r['stage']} | {r['model']} | | | | {r['seconds']:.0f} s |")
        else:
            lines.append(f"| {r['stage']} | {r['model']} | {r['pass@1']:.3f} | {r['format']:.3f} | "
                         f"{r['len']:.1f} | {r['seconds']:.0f} s |")
    lines.append(f"\nguessing a digit scores pass@1 {GUESS}; pass@1 is averaged over samples at "
                 "temperature 0.6, top-p 0.95")
    lines.append("\nheld-out pass@1 (on the first prompts of the held-out set) and mean completion length "
                 "during each RL stage:\n")
    for name, c in curves.items():
        evals = ", ".join(f"{step}: {p:.3f}" for step, p in c["eval"])
        lens = c["len"][:: max(1, len(c["len"]) // 4)] + c["len"][-1:] if c["len"] else []
        lengths = ", ".join(f"{step}: {n:.0f}" for step, n in dict(lens).items())
        lines.append(f"- {CURVE_NAMES[name]}: pass@1 at step {evals}; length at step {lengths}")
    lines.append(f"\nwhole pipeline, evaluations included: {total / 60:.1f} min")
    return lines


CURVE_NAMES = {"zero": "R1-Zero", "rl": "reasoning RL", "rl2": "second RL"}


def write_file(path, text):
    """Write text to path through a temporary name, so a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def plot(rows, curves, path, quick=False):
    """The card as a picture: pass@1 and format per stage as bars, and the RL stages' held-out
    pass@1 and mean length over steps; titled a smoke test for --quick; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if r.get("pass@1") is not None]
    x = range(len(rows))
    fig, (bars, acc, length) = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [2, 1, 1]})
    for shift, key, label in [(-0.2, "pass@1", "held-out pass@1"), (0.2, "format", "format rate")]:
        container = bars.bar([i + shift for i in x], [r[key] for r in rows], width=0.4, label=label)
        bars.bar_label(container, fmt="%.2f", fontsize=7)  # a bar of height 0 is invisible: its "0.00" is not
    bars.axhline(GUESS, color="gray", linestyle="--", linewidth=1, label="guessing a digit")
    bars.set_xticks(list(x), [r["stage"] for r in rows], rotation=25, ha="right")
    bars.set_ylim(0, 1.12)  # room for a label above a bar of 1
    bars.legend(fontsize=8)
    bars.set_title("what each stage bought")
    for name, c in curves.items():
        if c["eval"]:
            acc.plot(*zip(*c["eval"]), marker="o", label=CURVE_NAMES[name])
        if c["len"]:
            length.plot(*zip(*c["len"]), label=CURVE_NAMES[name])
    acc.axhline(GUESS, color="gray", linestyle="--", linewidth=1)
    acc.set(title="held-out pass@1 during RL", xlabel="RL step", ylim=(0, 1.05))
    length.set(title="mean completion length during RL", xlabel="RL step", ylabel="tokens")
    acc.legend(fontsize=8)
    length.legend(fontsize=8)
    if quick:
        fig.suptitle(SMOKE, color="darkred")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return True


def run_stages(args, size, out, stages):
    """Every training stage and rejection sampling, in R1's order -> {name: (checkpoint or
    file, seconds)}; each stage reads what an earlier one wrote."""
    dev, seed = args.device, args.seed
    try:
        rl_args, zero_args = shlex.split(args.rl_args), shlex.split(args.zero_args)
    except ValueError as e:
        raise SystemExit(f"error: --rl-args / --zero-args: {e}") from None
    data = os.path.join(out, "data")
    files = {name: os.path.join(data, f"{name}.jsonl")
             for name in ["pretrain", "mid", "cold_start", "train", "test", "fresh"]}
    done = {}
    stages.run("data", "data/sums/prepare.py", [
        "--out-dir", data, "--seed", seed, *[x for k in ["num_pretrain", "num_mid", "num_train", "num_test",
                                                          "num_fresh", "num_cold_start"]
                                              for x in (f"--{k.replace('_', '-')}", size[k])]])

    def sft(micro_batch=16):  # every SFT stage; pretraining's larger batches take larger micro-batches
        return ["--template", "raw", "--device", dev, "--seed", seed, "--micro-batch-size", micro_batch,
                "--val-fraction", 0]

    # every RL stage: temperature 1.0 (explore), no KL term (beta 0), the held-out curve on the way
    grpo = ["--template", "raw", "--device", dev, "--seed", seed, "--max-new-tokens", MAX_NEW_TOKENS,
            "--group", 8, "--prompts-per-step", 8, "--micro-batch-size", 128, "--temperature", 1.0,
            "--beta", 0, "--rewards", "accuracy,format", "--data", files["train"], "--sample-every", 10,
            "--eval-data", files["test"], "--eval-every", size["curve_every"], "--eval-prompts", size["curve_prompts"]]

    def train(name, script, flags):
        """One training stage writing checkpoints to OUT/name; records (its last checkpoint, seconds)."""
        seconds = stages.run(name, script, [*flags, "--out", os.path.join(out, name)], out=os.path.join(out, name))
        done[name] = (last_checkpoint(os.path.join(out, name)), seconds)
        return done[name][0]

    # 1. base: pretraining text (the skills, and exercises of the procedure; no question), then
    # a short mid-training on answered questions, half of them worked out stepwise
    pre = train("pretrain", "sft.py", ["--init", "scratch", *BASE, "--data", files["pretrain"],
                                       "--epochs", size["pretrain_epochs"], "--batch-size", 32, "--lr", 3e-3,
                                       *sft(32)])
    base = train("base", "sft.py", ["--model", pre, "--data", files["mid"], "--epochs", size["mid_epochs"],
                                    "--batch-size", 16, "--lr", 2e-3, *sft()])
    # the student's base, pretrained here too so that no later change retrains it
    small = train("small", "sft.py", ["--init", "scratch", *SMALL, "--data", files["pretrain"],
                                      "--epochs", size["small_epochs"], "--batch-size", 32, "--lr", 3e-3,
                                      *sft(32)])
    # 2. R1-Zero: RL straight on the base, no supervised data at all
    train("zero", "grpo.py", ["--model", base, "--num-steps", size["zero_steps"], "--lr", 2e-4,
                              *grpo, *rl_args, *zero_args])
    # 3. cold start: the base imitates a few hundred expert traces, half of them terse
    cold = train("cold", "sft.py", ["--model", base, "--data", files["cold_start"], "--epochs", size["cold_epochs"],
                                    "--batch-size", 16, "--lr", 2e-3, *sft()])
    # 4. reasoning RL from the cold-start model
    rl = train("rl", "grpo.py", ["--model", cold, "--num-steps", size["rl_steps"], "--lr", 2e-4, *grpo, *rl_args])
    # 5. rejection sampling: the RL model answers fresh prompts; one verified answer per prompt is kept
    kept = os.path.join(out, "kept.jsonl")
    seconds = stages.run("reject", "reject_sample.py", [
        "--model", rl, "--data", files["fresh"], "--template", "raw", "--num-samples", size["reject_samples"],
        "--max-new-tokens", MAX_NEW_TOKENS, "--prompts-per-batch", 50, "--keep-per-prompt", 1,
        "--device", dev, "--seed", seed, "--out", kept, "--overwrite"])
    done["reject"] = (kept, seconds)
    if not json.load(open(os.path.join(out, "kept.report.json")))["kept"]:
        raise SystemExit(f"error: rejection sampling kept no sample (see {os.path.join(out, 'kept.report.json')}): "
                         "the RL model answered no fresh prompt right, so there is nothing to learn from")
    # 6. R1's next stage: the base (not the RL model) fine-tuned on the kept samples
    rs = train("rs", "sft.py", ["--model", base, "--data", kept, "--epochs", size["rs_epochs"],
                                "--batch-size", 16, "--lr", 2e-3, *sft()])
    # 7. and RL again, from that model
    train("rl2", "grpo.py", ["--model", rs, "--num-steps", size["rl2_steps"], "--lr", 1e-4, *grpo, *rl_args])
    # 8. distillation: the smaller base fine-tuned on the kept samples, and on the cold-start data alone
    student = ["--model", small, "--epochs", size["student_epochs"], "--batch-size", 16, "--lr", 2e-3, *sft()]
    train("student", "sft.py", ["--data", kept, *student])
    train("student-cold", "sft.py", ["--data", files["cold_start"], *student])
    return done, files


def curve(folder):
    """An RL stage's training curve from its metrics.jsonl: held-out pass@1 at each evaluation,
    mean completion length at each step -> {"eval": [[step, pass@1], ...], "len": [[step, len], ...]}."""
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    return {"eval": [[r["step"], r["eval_pass@1"]] for r in rows if "eval_pass@1" in r],
            "len": [[r["step"], r["len"]] for r in rows if "len" in r and "eval_pass@1" not in r]}


def main(argv=None):
    args = get_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    stages = Stages(out, args.fresh)
    done, files = run_stages(args, size, out, stages)

    # the report card: every model on the same held-out prompts
    models = [("base", "1 base"), ("zero", "2 R1-Zero"), ("cold", "3 cold start"), ("rl", "4 reasoning RL"),
              ("rs", "6 base SFT on kept"), ("rl2", "7 second RL"), ("small", "8 small base"),
              ("student-cold", "8 student, cold-start data"), ("student", "8 student, distilled")]
    rows = []
    for name, stage in models:
        model, seconds = done[name]
        report = evaluate(stages, name, model, files["test"], out, size["eval_samples"], args.device, args.seed)
        rows.append({"stage": stage, "model": os.path.relpath(model, out), "seconds": seconds,
                     "pass@1": report["pass@1"], "format": report["format"], "len": report["len"]})
        if name == "base":
            rows[-1]["seconds"] += done["pretrain"][1]  # pretraining and mid-training
        if name == "rl":
            kept = json.load(open(os.path.join(out, "kept.report.json")))
            rows.append({"stage": "5 rejection sampling", "seconds": done["reject"][1],
                         "model": f"kept.jsonl: {kept['kept']} of {kept['samples']} samples"})
    curves = {name: curve(os.path.join(out, name)) for name in ["zero", "rl", "rl2"]}
    total = sum(stage["seconds"] for stage in stages.done.values())  # a reused stage counts its own run
    lines = card_lines(rows, curves, total, args.quick)
    print("\n".join(lines))
    write_file(os.path.join(out, "card.md"), "\n".join(lines) + "\n")
    write_file(os.path.join(out, "card.json"), json.dumps(
        {"rows": rows, "curves": curves, "minutes": total / 60, "quick": args.quick, "seed": args.seed}, indent=2))
    png = os.path.join(out, "card.png")
    print(f"wrote {os.path.join(out, 'card.md')}, {os.path.join(out, 'card.json')}" +
          (f" and {png}" if plot(rows, curves, png, args.quick) else " (no plot: matplotlib is not installed)"))


if __name__ == "__main__":
    main()
