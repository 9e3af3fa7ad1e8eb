"""Ablations in one command: named variants of one training command, each over several seeds, compared.

Each (variant, seed) is one run of grpo.py (or of the script a variant swaps in, such as
ppo.py): the --base command, then the variant's flags (a flag that takes a value, given
twice: the later one wins; a switch in --base cannot be turned off by a variant), then
--seed S --out OUT/VARIANT/seed-S, started in the current folder. Runs go --parallel at a
time, each with the machine's cores / --parallel threads. The comparison is printed and
written to OUT/ablation.md, OUT/ablation.json and, with matplotlib, OUT/ablation.png.

    python ablate.py --base "grpo.py --model out/sums/cold/step-000228 --data ... --eval-data ... --eval-every 10" \\
        --variant grpo= --variant "dr-grpo=--scale none --agg seq-sum" \\
        --variant "ppo=@ppo.py --group 1 --prompts-per-step 64" --seeds 0-4 --parallel 2 --out out/ablate

A variant is NAME=FLAGS; FLAGS starting with @SCRIPT run that script instead of the base's.
A run that finished (OUT/VARIANT/seed-S.done.json, written after it exits 0, with the same
command) is not run again; a stopped one (Ctrl-C, SIGTERM, a crash) goes on from its newest
checkpoint with --resume; a failed one is reported with its log's last line, and the others
go on. So a re-run after Ctrl-C or a fix loses nothing. A run whose command changed starts
over. Ctrl-C reaches the runs from the terminal; a SIGTERM to the harness is passed on.

The statistics, per variant over its seeds (every seed counts once):
- held-out pass@1 at the last evaluation ("final"), the best evaluation ("best"), and the
  area under the curve (the step-weighted mean of the curve, trapezoids: "auc");
- mean, standard deviation (n - 1) and a 95% interval mean +- t(0.975, n - 1) sd / sqrt(n),
  Student's t, which assumes the seeds' values are roughly normal; with one seed there is
  no interval, and with two or three it is wide: "unseparated" unless it excludes 0;
- the paired difference to the first variant over the seeds both have (the same seed gives
  both the same sampling and evaluation streams, and the same data order at the same
  prompts a step), with its own t interval: the seed's shared luck cancels;
- the evaluation's own noise, at most: the binomial std sqrt(p (1 - p) / (prompts x samples))
  of one evaluation at the final pass@1 p (the prompts being fixed, prompts of unequal
  difficulty make it smaller), beside the seeds' std: when the seeds' std is not larger,
  more evaluation prompts would say more than more seeds;
- from the training records: mean length and entropy over the last quarter of the steps,
  the median seconds a step and its phases, and the run's peak memory: its process's peak
  RSS (host memory, with evaluation and the Python runtime in it; not a GPU's memory; of
  the last part only, for a resumed run).

Deliberate simplifications: the runs share one machine (and its GPUs: set
CUDA_VISIBLE_DEVICES before the command to choose them); only a run's last evaluation
counts as "final", whatever its step; the interval is a t interval, not a bootstrap (a
bootstrap over 3 to 5 seeds is no better founded).
"""

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

from nanor1 import common

ROOT = os.path.dirname(os.path.abspath(__file__))
# Student's t, 0.975 quantile, for 1..30 degrees of freedom (then the normal's 1.960)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
PHASES = ["sample_s", "score_s", "ref_s", "critic_s", "update_s"]  # a step's seconds, as the scripts log them


def get_args(argv=None):
    p = common.short_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    p.add_argument("--base", required=True, help="the training command shared by every variant: 'SCRIPT FLAGS...', "
                                                 "without --seed and --out")
    p.add_argument("--variant", action="append", required=True,
                   help="NAME=FLAGS added after the base's; FLAGS '@SCRIPT ...' swap the script; the first variant is "
                        "the one the others are compared with (repeat the flag for each variant)")
    p.add_argument("--seeds", default="0-2", help="seeds: a range 0-4, a list 0,3,7, or both 0-2,9")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--out", default="out/ablate", help="folder of the runs, their logs and the comparison")
    p.add_argument("--report-only", action="store_true", help="run nothing: compare the runs already in --out")
    args = p.parse_args(argv)
    try:
        args.seeds = parse_seeds(args.seeds)
        args.variants = parse_variants(args.variant, args.base)
    except ValueError as e:
        p.error(str(e))
    if args.parallel < 1:
        p.error("--parallel must be at least 1")
    return args


def parse_seeds(text):
    """'0-2,7' -> [0, 1, 2, 7]; anything else is a ValueError naming --seeds."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ValueError(f"--seeds {text!r}: expected a range like 0-4 or a list like 0,3,7")
        seeds += range(int(lo), int(hi or lo) + 1)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: a seed is named twice")
    return seeds


def parse_variants(texts, base):
    """['grpo=', 'ppo=@ppo.py --group 1'] and the base command -> {name: [script, flags...]}."""
    base = shlex.split(base)
    if not base or not base[0].endswith(".py"):
        raise ValueError(f"--base {' '.join(base)!r}: expected 'SCRIPT.py FLAGS...'")
    if any(f in ("--seed", "--out") or f.startswith(("--seed=", "--out=")) for f in base):
        raise ValueError("--base: leave out --seed and --out: every run gets its own")
    variants = {}
    for text in texts:
        name, eq, flags = text.partition("=")
        if not eq or not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError(f"--variant {text!r}: expected NAME=FLAGS, NAME of letters, digits, '-', '_', '.'")
        if name in variants:
            raise ValueError(f"--variant {name}: named twice")
        try:
            flags = shlex.split(flags)
        except ValueError as e:
            raise ValueError(f"--variant {text!r}: {e}") from None
        script = base[0]
        if flags and flags[0].startswith("@"):
            script, flags = flags[0][1:], flags[1:]
            if not script.endswith(".py"):
                raise ValueError(f"--variant {text!r}: '@{script}' is not a Python script")
        if any(f in ("--seed", "--out") or f.startswith(("--seed=", "--out=")) for f in flags):
            raise ValueError(f"--variant {name}: leave out --seed and --out: every run gets its own")
        variants[name] = [script, *base[1:], *flags]
    return variants

# ----------------------------------------------------------------------------------------
# the runs


def has_checkpoint(folder):
    return os.path.isdir(folder) and any(d.startswith("step-") and os.path.exists(os.path.join(folder, d, "trainer_state.pt"))
                                         for d in os.listdir(folder))


def plan(args):
    """Every (variant, seed) -> a list of dicts: name, seed, folder, command, and what to do:
    'skip' (finished with this command), 'resume', or 'start'."""
    runs = []
    for name, (script, *flags) in args.variants.items():
        for seed in args.seeds:
            folder = os.path.join(args.out, name, f"seed-{seed}")
            command = [script, *flags, "--seed", str(seed), "--out", folder]
            done = read_json(folder + ".done.json")
            if done and done["command"] == command:
                action = "skip"
            elif has_checkpoint(folder) and read_json(folder + ".run.json", {}).get("command") == command:
                action = "resume"
            else:
                action = "start"
            runs.append({"name": name, "seed": seed, "folder": folder, "command": command, "action": action})
    return runs


def read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path, data):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(path + ".tmp", path)


def last_line(path):
    """The last non-empty line of a log: a failed script's one-line error."""
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "(empty log)"


def launch(run, threads):
    """Start one run in the background -> its Popen; its output goes to FOLDER.log."""
    os.makedirs(os.path.dirname(run["folder"]), exist_ok=True)
    extra = ["--resume"] if run["action"] == "resume" else ["--overwrite"]
    write_json(run["folder"] + ".run.json", {"command": run["command"]})
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.join(ROOT, run["command"][0]), *run["command"][1:], *extra]
    print(f"[{run['name']} seed {run['seed']}] {run['action']}: python {shlex.join(run['command'] + extra)}", flush=True)
    run["started"] = time.time()
    with open(run["folder"] + ".log", "a" if run["action"] == "resume" else "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)  # in the caller's folder


def run_all(runs, parallel):
    """Run what is to be run, `parallel` at a time -> the failed runs. Each finished run's
    peak memory comes from the operating system's account of the process (os.wait4)."""
    todo = [r for r in runs if r["action"] != "skip"]
    threads = max(1, (os.cpu_count() or 1) // parallel)  # the cores shared out: no run waits for another's threads
    running, failed, stopped = {}, [], False

    def finished(pid, status, usage):  # -> True when the run was stopped by a signal
        run, proc = running.pop(pid)
        code = proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.time() - run["started"]
        if code in (130, -signal.SIGINT, -signal.SIGTERM):  # stopped at a step's end, with a checkpoint
            print(f"[{run['name']} seed {run['seed']}] stopped; the same command goes on with it", flush=True)
            return True
        if code == 0:
            write_json(run["folder"] + ".done.json", {"command": run["command"], "seconds": seconds,
                                                      "peak_mib": usage.ru_maxrss / 1024})  # KiB on Linux
            print(f"[{run['name']} seed {run['seed']}] done in {seconds:.0f} s", flush=True)
        else:
            run["error"] = last_line(run["folder"] + ".log")
            failed.append(run)
            print(f"[{run['name']} seed {run['seed']}] FAILED (exit {code}): {run['error']} "
                  f"(log {run['folder']}.log)", flush=True)
        return False

    def terminate(signum, frame):  # SIGTERM reaches the harness alone: pass it on to the runs
        for _, proc in running.values():
            proc.send_signal(signal.SIGTERM)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, terminate)
    try:
        while todo or running:
            while todo and len(running) < parallel:
                run = todo.pop(0)
                proc = launch(run, threads)
                running[proc.pid] = (run, proc)
            pid, status, usage = os.wait4(-1, 0)
            if pid in running and finished(pid, status, usage):
                todo, stopped = [], True  # start nothing more; the others end on their own
    except KeyboardInterrupt:  # Ctrl-C reached the runs too: each stops at its step's end, with a checkpoint
        stopped = True
        while running:  # (a run in its last step finishes instead: it is marked done)
            finished(*os.wait4(next(iter(running)), 0))
    finally:
        signal.signal(signal.SIGTERM, before)
    if stopped:
        raise SystemExit("stopped: run the same command again to go on (finished runs are kept, stopped ones resume)")
    return failed

# ----------------------------------------------------------------------------------------
# the statistics


def mean_sd(xs):
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else None)


def t_interval(xs):
    """mean, sd and the 95% interval (lo, hi) of the mean of xs by Student's t; sd and the
    interval are None with fewer than two values."""
    m, sd = mean_sd(xs)
    if sd is None:
        return {"mean": m, "sd": None, "lo": None, "hi": None, "n": len(xs)}
    half = (T975[len(xs) - 2] if len(xs) - 1 <= len(T975) else 1.960) * sd / math.sqrt(len(xs))
    return {"mean": m, "sd": sd, "lo": m - half, "hi": m + half, "n": len(xs)}


def auc(curve):
    """The step-weighted mean of a curve [(step, value), ...] by trapezoids (its only value when one)."""
    if len(curve) == 1:
        return curve[0][1]
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(curve, curve[1:]))
    return area / (curve[-1][0] - curve[0][0])


def median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2 if xs else None


def summarise_run(folder):
    """One run's numbers from its metrics.jsonl -> dict, or None when it has no evaluation."""
    lines = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    flags = lines[0]["args"]
    curve = [(r["step"], r["eval_pass@1"]) for r in lines[1:] if "eval_pass@1" in r]
    steps = [r for r in lines[1:] if "reward" in r]
    if not curve or not steps:
        return None
    tail = steps[-max(1, len(steps) // 4):]  # the last quarter of the steps
    mean = lambda key: sum(r[key] for r in tail if r.get(key) is not None) / max(1, sum(r.get(key) is not None for r in tail))
    with open(flags["eval_data"]) as f:
        n_eval = sum(1 for line in f if line.strip())
    n_eval = min(n_eval, flags["eval_prompts"] or n_eval)
    p = curve[-1][1]
    return {**sample_lengths(folder, steps[-1]["step"]), "final": p, "best": max(v for _, v in curve), "auc": auc(curve), "curve": curve,
            "len": mean("len"), "entropy": mean("entropy"), "s": median([r["s"] for r in steps]),
            "phases": {k: median([r[k] for r in steps]) for k in PHASES if k in steps[0]},
            "eval_noise": math.sqrt(p * (1 - p) / (n_eval * flags["eval_samples"])),
            "len_curve": [(r["step"], r["len"]) for r in steps],
            "entropy_curve": [(r["step"], r["entropy"]) for r in steps if r.get("entropy") is not None]}


def sample_lengths(folder, last_step):
    """The mean length in tokens of the right and of the wrong completions that the run wrote to
    samples.jsonl (--sample-every) in the second half of its steps -> {"len_right", "len_wrong"},
    None where there were none (Dr. GRPO's claim is about the wrong ones' length)."""
    path = os.path.join(folder, "samples.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    rows = [r for r in rows if r["step"] > last_step / 2 and "accuracy" in r.get("parts", {})]
    out = {}
    for key, right in [("len_right", True), ("len_wrong", False)]:
        n = [r["num_tokens"] for r in rows if (r["parts"]["accuracy"] > 0) == right]
        out[key] = sum(n) / len(n) if n else None
    return out


def compare(runs, variants):
    """Per variant: each seed's numbers, their statistics, and the paired differences to the first variant."""
    by = {name: {} for name in variants}
    for run in runs:
        done = read_json(run["folder"] + ".done.json")
        if done and done["command"] == run["command"]:
            s = summarise_run(run["folder"])
            if s:
                by[run["name"]][run["seed"]] = {**s, "peak_mib": done["peak_mib"]}
    first = next(iter(variants))
    table = {}
    for name, seeds in by.items():
        if not seeds:
            table[name] = {"seeds": []}
            continue
        row = {"seeds": sorted(seeds), "runs": {str(s): v for s, v in sorted(seeds.items())}}
        for key in ["final", "best", "auc"]:
            row[key] = t_interval([v[key] for v in seeds.values()])
        for key in ["len", "entropy", "s", "peak_mib", "eval_noise", "len_right", "len_wrong"]:
            known = [v[key] for v in seeds.values() if v[key] is not None]
            row[key] = mean_sd(known)[0] if known else None
        row["phases"] = {k: mean_sd([v["phases"][k] for v in seeds.values()])[0] for k in next(iter(seeds.values()))["phases"]}
        shared = sorted(set(seeds) & set(by[first]))
        if name != first and shared:
            row["paired"] = {key: t_interval([seeds[s][key] - by[first][s][key] for s in shared])
                             for key in ["final", "best", "auc"]}
        table[name] = row
    return table


def verdict(diff):
    """What a paired interval says about a difference."""
    if diff["n"] < 2:
        return "one seed: no interval"
    if diff["sd"] == 0 and diff["mean"] == 0:
        return "identical"  # the same numbers on every seed
    if diff["lo"] > 0:
        return "higher"
    if diff["hi"] < 0:
        return "lower"
    return "unseparated"


def report(table, variants, args):
    """The comparison as markdown lines."""
    first = next(iter(variants))
    pm = lambda x: f"{x['mean']:.3f}" if x["sd"] is None else f"{x['mean']:.3f} ± {x['sd']:.3f} [{x['lo']:.3f}, {x['hi']:.3f}]"
    lines = [f"Held-out pass@1 over seeds {','.join(map(str, args.seeds))}: mean ± sd [95% t interval]; "
             f"paired differences against `{first}` over the same seeds.", "",
             "| variant | seeds | final | best | area | final - " + first + " | | eval noise | len | entropy | s/step | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        if not row["seeds"]:
            lines.append(f"| {name} | 0 | (no finished run) |" + " |" * 9)
            continue
        d = row.get("paired", {}).get("final")
        diff = "" if d is None else (f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d["sd"] is not None else f"{d['mean']:+.3f}")
        lines.append(f"| {name} | {len(row['seeds'])} | {pm(row['final'])} | {pm(row['best'])} | {pm(row['auc'])} | {diff} | "
                     f"{verdict(d) if d else ''} | {row['eval_noise']:.3f} | {row['len']:.1f} | {row['entropy']:.3f} | "
                     f"{row['s']:.2f} | {row['peak_mib']:.0f} |")
    phases = sorted({k for row in table.values() if row["seeds"] for k in row["phases"]}, key=PHASES.index)
    lines += ["", "Seconds a step by phase (median over steps, mean over seeds):", "",
              "| variant | " + " | ".join(k.removesuffix("_s") for k in phases) + " | total |",
              "|---|" + "---|" * (len(phases) + 1)]
    for name, row in table.items():
        if row["seeds"]:
            lines.append(f"| {name} | " + " | ".join(f"{row['phases'].get(k, 0):.2f}" for k in phases) + f" | {row['s']:.2f} |")
    show = lambda x: "-" if x is None else f"{x:.1f}"
    lines += ["", "Length in tokens of the right and the wrong completions of samples.jsonl, second half of the steps "
              "(mean over seeds):", "", "| variant | right | wrong |", "|---|---|---|"]
    lines += [f"| {name} | {show(row['len_right'])} | {show(row['len_wrong'])} |" for name, row in table.items() if row["seeds"]]
    lines += ["", "Commands (each with --seed S --out OUT/VARIANT/seed-S):", ""]
    lines += [f"- `{name}`: `python {shlex.join(cmd)}`" for name, cmd in variants.items()]
    return lines


def plot(table, path):
    """ablation.png: pass@1, length and entropy over steps (mean and min-max band over seeds),
    the final pass@1 of each seed, the seconds a step by phase and the peak memory. False
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = {n: r for n, r in table.items() if r["seeds"]}
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    axes = axes.flatten()
    for i, (name, row) in enumerate(rows.items()):
        color = f"C{i}"
        for ax, key in zip(axes[:3], ["curve", "len_curve", "entropy_curve"]):
            curves = [dict(run[key]) for run in row["runs"].values()]
            steps = sorted(set.intersection(*[set(c) for c in curves]))
            ys = [[c[s] for c in curves] for s in steps]
            ax.plot(steps, [sum(y) / len(y) for y in ys], color=color, label=name)
            ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.2)
        finals = [run["final"] for run in row["runs"].values()]
        axes[3].scatter([i] * len(finals), finals, color=color)
        axes[3].errorbar([i + 0.15], [row["final"]["mean"]], yerr=[[row["final"]["mean"] - (row["final"]["lo"] or row["final"]["mean"])],
                         [(row["final"]["hi"] or row["final"]["mean"]) - row["final"]["mean"]]], fmt="o", color="black", capsize=3)
        bottom = 0.0
        for phase in [k for k in PHASES if k in row["phases"]]:  # each phase its colour in every bar
            seconds = row["phases"][phase]
            name = phase.removesuffix("_s")
            labelled = name in axes[4].get_legend_handles_labels()[1]
            axes[4].bar(i, seconds, bottom=bottom, color=f"C{PHASES.index(phase)}", label=None if labelled else name)
            bottom += seconds
        axes[5].bar(i, row["peak_mib"], color=color)
    for ax, title in zip(axes, ["held-out pass@1 (band: the seeds' range)", "mean length (tokens)", "entropy (nats/token)",
                                "final pass@1 per seed (black: mean, 95% t)", "seconds a step", "peak memory (MiB)"]):
        ax.set_title(title)
    for ax in axes[:3]:
        ax.set_xlabel("step")
    axes[0].legend()
    axes[4].legend()
    for ax in axes[3:]:
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(list(rows), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None):
    args = get_args(argv)
    runs = plan(args)
    failed = [] if args.report_only else run_all(runs, args.parallel)
    table = compare(runs, args.variants)
    lines = report(table, args.variants, args)
    for run in failed:
        lines.append(f"- FAILED: {run['name']} seed {run['seed']}: {run['error']} (log {run['folder']}.log)")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(args.out, "ablation.json"), {"variants": args.variants, "seeds": args.seeds, "table": table})
    plot(table, os.path.join(args.out, "ablation.png"))
    if failed:
        sys.exit(1)
    return table


if __name__ == "__main__":
    main()
