"""Rejection sampling and evaluation: sample many completions per prompt, keep the verified.

R1 turns an RL checkpoint into SFT data this way: several samples per prompt, scored by the
same rules as training (rewards.py), and only the correct ones that are well formed, in
one language and not too long are kept. The same sampling and scoring is R1's evaluation
protocol (temperature 0.6, top-p 0.95, k samples per question; pass@1 is the mean
correctness over the k, cons@k the correctness of the majority-vote answer), so with
--eval-only this script is the project's evaluator and writes no samples, only its report
(printed, and as json with --report FILE). With
--prompt TEXT (repeatable) it only prints what the model writes after TEXT, like nanoGPT's sample.py.

Files, for --out kept.jsonl:
    kept.jsonl         kept samples, ready for sft.py: prompt, completion, score, model, ...
    kept.pass.jsonl    one line per prompt: its own fields plus pass rate and counts; it is
                       valid grpo.py --data, and --rl-out keeps the prompts with
                       0.1 < pass rate < 0.9, the ones RL still learns from
    kept.run.json      the flags, checked when the run is resumed
    kept.report.json   the report printed at the end
Both jsonl files grow batch by batch (under torchrun each process's own pair of shard files
does). A restarted run skips the prompts already done and, with the same flags (seed, batch
size and number of processes included), writes exactly the files an uninterrupted run writes.

Deliberate simplifications:
- a sample is correct when the first of accuracy, cosine, code, code_strict named in
  --rewards says so (accuracy 1, all tests passed, cosine > 0);
- the majority vote groups extracted answers by grader.math_equal against the first
  answer of each group; samples without an answer do not vote; truncated samples are
  judged like the others (as the accuracy reward judges them) for pass@k and cons@k;
- duplicates are exact matches after collapsing whitespace;
- under torchrun, process r samples prompts r, r + W, r + 2W, ... into its own files
  (so each process resumes on its own); at the end process 0 gathers every record over
  gloo (no shared disk needed) and writes the merged, ordered files: the kept samples of
  the whole run pass through process 0's memory once.

    python reject_sample.py --model out/grpo/step-000100 --data train.jsonl --num-samples 8 --out kept.jsonl
    python reject_sample.py --model Qwen2.5-Math-1.5B --data test.jsonl --num-samples 16 --eval-only
    python reject_sample.py --model out/grpo/step-000100 --prompt "What is 12 + 7?" --prompt "What is 8 * 9?"
    torchrun --nproc_per_node 8 reject_sample.py --model M --data train.jsonl --num-samples 64 --out kept.jsonl
"""

import argparse
import glob
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import rewards as R
from nanor1 import common, distributed, grader, models, sampling

# the reward that decides "correct", and the value that counts as correct
CORRECT = {"accuracy": lambda v: v >= 1, "code": lambda v: v >= 1, "code_strict": lambda v: v >= 1,
           "cosine": lambda v: v > 0}
# the keep rules, in the order a sample is checked: a dropped sample counts for the first it breaks
REASONS = ["truncated", "wrong", "format", "language", "long", "duplicate", "cap"]
# flags that change what a sample or a kept line means, and the seed: a resumed run must repeat them
RESUME_KEYS = ["model", "template", "data", "num_samples", "max_new_tokens", "temperature", "top_p", "seed",
               "rewards", "lang", "format_check", "min_language", "max_kept_tokens", "keep_per_prompt",
               "keep_order"]


def get_args(argv=None):
    p = common.short_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    # model
    p.add_argument("--model", required=True, help="local folder, hub id, or short name (Qwen2.5-0.5B)")
    p.add_argument("--template", default="r1", choices=["r1", "chat", "raw"],
                   help="prompt format, as in grpo.py and sft.py; train on the kept file with the same one")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps; under torchrun auto = cuda:LOCAL_RANK")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights and compute dtype (no training here); auto = bfloat16 on CUDA, else float32")
    # data
    p.add_argument("--data", help="prompts, jsonl with 'prompt' and what --rewards needs ('answer', 'tests')")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="instead of --data: print what the model writes after TEXT (repeatable); nothing is written")
    p.add_argument("--max-prompts", type=int, default=0, help="use the first N prompts; 0 = all")
    # sampling
    p.add_argument("--num-samples", type=int, default=8, help="completions per prompt, the k of pass@k and cons@k")
    p.add_argument("--prompts-per-batch", type=int, default=8, help="prompts sampled together; batch = this x --num-samples sequences")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="completion length limit, tokens; default 1024, or what the context leaves when less")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (R1: 0.6); 0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (R1: 0.95), 1 = off")
    p.add_argument("--seed", type=int, default=0, help="seed; each batch is seeded by it and its first prompt's index")
    # scoring
    p.add_argument("--rewards", default="accuracy,format",
                   help="rewards.py names with optional :weight, as in grpo.py; the weighted sum is the kept 'score', "
                        "and one of accuracy, cosine, code, code_strict decides correctness")
    p.add_argument("--lang", default="en", help="language of the chain of thought for prompts without 'lang'")
    # what is kept
    p.add_argument("--format-check", default="r1", choices=["r1", "think", "none"],
                   help="r1: <think>...</think><answer>...</answer> exactly; think: one <think>...</think> then an "
                        "answer (distilled models); none: no check (the report's format rate is then r1's)")
    p.add_argument("--min-language", type=float, default=0.95,
                   help="least share of the chain of thought's words in the prompt's language; 0 = no check")
    p.add_argument("--max-kept-tokens", type=int, default=0, help="longest completion kept, tokens; 0 = no cap below --max-new-tokens")
    p.add_argument("--keep-per-prompt", type=int, default=4, help="kept samples per prompt, at most; 0 = every distinct one")
    p.add_argument("--keep-order", default="shortest", choices=["shortest", "random"],
                   help="which passing samples are kept first: fewest tokens, or a seeded random order")
    # output
    p.add_argument("--out", default=None, help="kept samples, jsonl; the pass-rate, flags and report files go beside it")
    p.add_argument("--eval-only", action="store_true", help="write no samples; print pass@k, cons@k and the rates")
    p.add_argument("--report", default=None, help="also write the report printed at the end here (json); with "
                                                  "--eval-only the one file written")
    p.add_argument("--overwrite", action="store_true", help="delete the files of an earlier run at --out instead of resuming it")
    p.add_argument("--rl-out", default=None, help="also write the prompts whose pass rate is inside --rl-range here (jsonl)")
    p.add_argument("--rl-range", type=float, nargs=2, default=(0.1, 0.9), metavar=("LO", "HI"),
                   help="with --rl-out: the open interval of pass rates kept")
    args = p.parse_args(argv)

    # contradictions fail here, naming the flag, before any model is loaded
    common.check_ranges(p, args, ["num_samples", "prompts_per_batch", "max_new_tokens"],
                        ["max_prompts", "max_kept_tokens", "keep_per_prompt"])
    if not args.temperature >= 0 or not math.isfinite(args.temperature):
        p.error("--temperature must be a number >= 0 (0 = greedy)")
    if args.temperature == 0 and args.num_samples > 1:
        p.error("--temperature 0 is greedy: its samples would all be the same; use --num-samples 1")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if not 0 <= args.min_language <= 1:
        p.error("--min-language must be in [0, 1]")
    try:
        names = [name for name, _, _ in R.parse_rewards(args.rewards)]
    except ValueError as e:
        p.error(f"--rewards: {e}")
    if not any(name in CORRECT for name in names):
        p.error(f"--rewards {args.rewards}: name one of {', '.join(CORRECT)}; it decides which samples are correct")
    if args.lang not in R.SCRIPTS:
        p.error(f"--lang: unknown language '{args.lang}' (known: {', '.join(sorted(R.SCRIPTS))})")
    if not 0 <= args.rl_range[0] < args.rl_range[1] <= 1:
        p.error("--rl-range LO HI: expected 0 <= LO < HI <= 1")
    if bool(args.data) == bool(args.prompt):
        p.error("give --data FILE (prompts to sample, score and keep) or --prompt TEXT (print what the model writes)")
    if args.prompt and (args.out or args.rl_out or args.overwrite or args.eval_only or args.report):
        p.error("--prompt prints and writes nothing: drop --out, --rl-out, --report, --overwrite and --eval-only")
    if args.prompt and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error("--prompt runs in one process, not under torchrun")
    if args.prompt and not all(text.strip() for text in args.prompt):
        p.error("--prompt: a prompt is empty")
    if args.eval_only and (args.out or args.rl_out or args.overwrite):
        p.error("--eval-only writes no samples: drop --out, --rl-out and --overwrite (--report FILE keeps the report)")
    if not (args.eval_only or args.prompt or args.out):
        p.error("--out is required (or --eval-only to write no samples)")
    for flag, path in [("--out", args.out), ("--rl-out", args.rl_out), ("--report", args.report)]:
        if path and os.path.isdir(path):
            p.error(f"{flag} {path}: is a folder; give a file name such as {os.path.join(path, 'kept.jsonl')}")
    for flag, path in [("--rl-out", args.rl_out), ("--report", args.report)]:
        if path and args.out and os.path.abspath(path) in {os.path.abspath(f) for f in output_paths(args.out).values()}:
            p.error(f"{flag} {path}: is one of the files of --out {args.out}")
    return args


# ----------------------------------------------------------------------------------------
# the report's numbers


def pass_at_k(n, c, k):
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al., 2021):
    the chance that k of them, drawn without replacement, include a correct one."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@{k} needs 0 < k <= n and 0 <= c <= n (n={n}, c={c})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(answers, gold, equal=grader.math_equal):
    """cons@k of one prompt -> (the most frequent answer, whether it equals gold).

    answers: each sample's extracted answer, None when it has none (no vote). Answers with
    the same value are one group (1/2, 0.5, \\frac12): each new answer is compared with the
    first answer of every group so far. A tie goes to the group whose answer came first.
    """
    groups = []  # [first answer, votes]
    group_of = {}  # answer text -> its group, so a repeated string costs no comparison
    for a in answers:
        if a is None:
            continue
        key = " ".join(a.split())
        if key not in group_of:
            group_of[key] = next((g for g in groups if equal(key, g[0])), None)
            if group_of[key] is None:
                groups.append([key, 0])
                group_of[key] = groups[-1]
        group_of[key][1] += 1
    if not groups:
        return None, False
    best = max(groups, key=lambda g: g[1])  # max keeps the first of equal counts
    return best[0], bool(equal(best[0], gold))


def summarize(records, rl_range=(0.1, 0.9)):
    """Per-prompt records (the pass file's lines) -> the report: pass@j for j = 1, 2, 4, ...
    up to k, cons@k, rates per sample, and what was kept and dropped."""
    k = records[0]["num_samples"]
    n = len(records) * k
    report = {"prompts": len(records), "samples": n}
    for j in sorted({2 ** e for e in range(k.bit_length())} | {k}):  # 1, 2, 4, ... and k
        report[f"pass@{j}"] = float(np.mean([pass_at_k(k, r["num_correct"], j) for r in records]))
    votes = [r["cons_correct"] for r in records if r["cons_correct"] is not None]
    report[f"cons@{k}"] = float(np.mean(votes)) if votes else None  # None: no 'answer' (code tasks)
    report["format"] = sum(r["num_format"] for r in records) / n
    report["trunc"] = sum(r["num_truncated"] for r in records) / n
    report["len"] = sum(r["num_tokens"] for r in records) / n
    report["kept"] = sum(r["num_kept"] for r in records)
    report["prompts_kept"] = sum(r["num_kept"] > 0 for r in records)
    report["dropped"] = {why: sum(r["dropped"][why] for r in records) for why in REASONS}
    lo, hi = rl_range
    report["rl_prompts"] = sum(lo < r["pass_rate"] < hi for r in records)
    return report


def report_lines(report, rl_range):
    k = report["samples"] // report["prompts"]
    rates = " | ".join(f"{key} {report[key]:.3f}" for key in report if key.startswith("pass@"))
    cons = report[f"cons@{k}"]
    dropped = " | ".join(f"{why} {num}" for why, num in report["dropped"].items())
    return [f"{report['prompts']} prompts x {k} samples",
            f"{rates} | cons@{k} {'-' if cons is None else format(cons, '.3f')} | format {report['format']:.3f}"
            f" | trunc {report['trunc']:.3f} | len {report['len']:.0f}",
            f"kept {report['kept']} of {report['samples']} samples, from {report['prompts_kept']} of "
            f"{report['prompts']} prompts | dropped: {dropped}",
            f"{report['rl_prompts']} of {report['prompts']} prompts have {rl_range[0]} < pass rate < {rl_range[1]}"]


# ----------------------------------------------------------------------------------------
# the keep rules (REASONS, at the top, lists them in order)


def well_formed(text, check):
    if check == "r1":
        return R.format_reward(text, {}) == 1.0
    if check == "think":  # <think> ... </think> answer: what R1-Distill models write
        head, _, answer = text.strip().partition("</think>")
        return head.startswith("<think>") and head.count("<think>") == 1 and "</think>" not in answer \
            and bool(answer.strip())
    return True


def one_language(text, lang, threshold):
    """At least `threshold` of the chain of thought's words are in lang's script (as rewards.language
    counts them; with no <think> the text before </think>, or all of it, is the chain of thought).
    A chain of thought with no words at all (only math) is not mixed, and passes."""
    if threshold <= 0:
        return True
    thought = text.split("<think>", 1)[-1].split("</think>", 1)[0]
    words = R.words_by_script(thought)
    return not words or sum(script in R.SCRIPTS[lang] for script, _ in words) / len(words) >= threshold


def reject_reason(s, format_check, min_language, max_kept_tokens):
    """The first rule a sample breaks, or None when it may be kept. s: a dict with text,
    num_tokens, truncated, correct and lang."""
    if s["truncated"]:
        return "truncated"  # cut off mid-thought: it never learnt to stop here
    if not s["correct"]:
        return "wrong"
    if not well_formed(s["text"], format_check):
        return "format"
    if not one_language(s["text"], s["lang"], min_language):
        return "language"
    if max_kept_tokens and s["num_tokens"] > max_kept_tokens:
        return "long"
    return None


def select(samples, keep_per_prompt, order, rng):
    """Samples that broke no rule -> (kept, {"duplicate": n, "cap": n}). shortest: fewest
    tokens first (ties in sample order); random: a seeded shuffle. A sample equal to one
    already seen (whitespace collapsed) is a duplicate; past keep_per_prompt, the rest are cut.
    Each kept sample's "copies" counts the passing samples with its text (itself included)."""
    keys = [" ".join(s["text"].split()) for s in samples]
    for s, key in zip(samples, keys):
        s["copies"] = keys.count(key)
    if order == "shortest":
        ranked = sorted(samples, key=lambda s: s["num_tokens"])
    else:
        ranked = [samples[i] for i in rng.permutation(len(samples))]
    seen, kept, num_dup, num_cap = set(), [], 0, 0
    for s in ranked:
        key = " ".join(s["text"].split())
        if key in seen:
            num_dup += 1
        elif keep_per_prompt and len(kept) >= keep_per_prompt:
            num_cap += 1
        else:
            kept.append(s)
        seen.add(key)
    return kept, {"duplicate": num_dup, "cap": num_cap}


def judge_prompt(index, ex, rows, args, correct_name):
    """The k scored samples of one prompt -> (its pass record, its kept lines)."""
    samples = [{"text": r["text"], "num_tokens": len(r["completion"]), "truncated": r["truncated"],
                "correct": CORRECT[correct_name](r["parts"][correct_name]), "lang": ex.get("lang") or args.lang,
                "score": r["reward"], "parts": r["parts"]} for r in rows]
    dropped = dict.fromkeys(REASONS, 0)
    passing = []
    for s in samples:
        why = reject_reason(s, args.format_check, args.min_language, args.max_kept_tokens)
        if why:
            dropped[why] += 1
        else:
            passing.append(s)
    rng = np.random.default_rng([args.seed, index])  # the same choice however the run was batched
    kept, more = select(passing, args.keep_per_prompt, args.keep_order, rng)
    dropped.update(more)
    cons_answer = cons_correct = None
    if "answer" in ex:
        answers = [grader.extract_answer(s["text"]) for s in samples]  # as the accuracy reward extracts them
        cons_answer, cons_correct = majority_vote(answers, ex["answer"])
    num_correct = sum(s["correct"] for s in samples)
    record = {k: v for k, v in ex.items() if k != "_where"}  # the prompt's own fields: valid grpo.py data
    record.update({
        "prompt_index": index, "pass_rate": num_correct / len(samples), "num_samples": len(samples),
        "num_correct": num_correct, "cons_answer": cons_answer, "cons_correct": cons_correct,
        "num_format": sum(well_formed(s["text"], args.format_check if args.format_check != "none" else "r1")
                          for s in samples),
        "num_truncated": sum(s["truncated"] for s in samples),
        "num_tokens": sum(s["num_tokens"] for s in samples), "num_kept": len(kept), "dropped": dropped})
    lines = [{"prompt": ex["prompt"], "completion": s["text"], "score": s["score"], "parts": s["parts"],
              "num_tokens": s["num_tokens"], "copies": s["copies"], "answer": ex.get("answer"), "model": args.model,
              "prompt_index": index} for s in kept]
    return record, lines


# ----------------------------------------------------------------------------------------
# files: appended per batch, repaired and resumed after a crash, merged across processes


def output_paths(out, rank=0, world=1):
    """The files of a run at --out; under torchrun each process appends to its own shard pair."""
    base = out[: -len(".jsonl")] if out.endswith(".jsonl") else out
    shard = f"{base}.rank{rank}of{world}"
    return {"base": base, "kept": out, "pass": f"{base}.pass.jsonl", "run": f"{base}.run.json",
            "report": f"{base}.report.json", "kept_shard": f"{shard}.jsonl", "pass_shard": f"{shard}.pass.jsonl"}


def append_lines(path, records):
    """One write per batch: a crash can cut only the last line short, and read_pair drops it.
    fsync, so that a batch's kept lines are on disk before its pass lines, even after a power cut."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path, data):
    with open(f"{path}.tmp", "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


def read_lines(path):
    """-> [(record, raw line)]. A last line without its newline was cut short by a crash and
    is left out; any other line that is not ours is an error naming it."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    out = []
    for n, raw in enumerate(data[: data.rfind(b"\n") + 1].split(b"\n")[:-1], 1):
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt_index"), int):
            raise common.UserError(f"{path}:{n}: not a line reject_sample.py wrote; move the file away or "
                                   "use --overwrite")
        out.append((rec, raw + b"\n"))
    return out


def read_pair(kept_path, pass_path):
    """The prompts a (kept, pass) pair of files holds -> {prompt index: (pass line, kept lines)}.

    A batch's kept lines are written before its pass lines, so a prompt is done exactly when
    its pass line is complete; kept lines of a prompt that is not done (its batch was cut
    short) are left out, and that batch is sampled again, with the same seed.
    """
    prompts = {rec["prompt_index"]: (raw, []) for rec, raw in read_lines(pass_path)}
    for rec, raw in read_lines(kept_path):
        if rec["prompt_index"] in prompts:
            prompts[rec["prompt_index"]][1].append(raw)
    return prompts


def write_pair(kept_path, pass_path, prompts):
    """Rewrite a pair of files from read_pair's dict, ordered by prompt: kept first, then
    pass, so a crash in between leaves kept lines that read_pair ignores."""
    order = sorted(prompts)
    write_atomic(kept_path, b"".join(line for i in order for line in prompts[i][1]))
    write_atomic(pass_path, b"".join(prompts[i][0] for i in order))


def shard_files(base):
    """Shard pairs left on this disk by a torchrun run, of any number of processes."""
    found = glob.glob(f"{glob.escape(base)}.rank*of*.pass.jsonl")
    return [(p[: -len(".pass.jsonl")] + ".jsonl", p) for p in sorted(found)]


def check_flags(files, args, keys=RESUME_KEYS):
    """Before anything is loaded: refuse to resume files written with other flags (or by
    something else). --overwrite skips the check; the files go once the data has been read.
    --max-new-tokens left out is checked once fitted to the model's context (keys: that one)."""
    if args.overwrite or not (any(os.path.exists(path) and os.path.getsize(path) for path in [files["kept"], files["pass"]])
                              or shard_files(files["base"])):
        return
    if not os.path.exists(files["run"]):
        raise common.UserError(f"--out {args.out}: the file exists but {files['run']} does not, so it was not "
                               "written by this script; use another --out, or --overwrite")
    with open(files["run"]) as f:
        before = json.load(f)
    for key in keys:
        if before.get(key) != getattr(args, key) and getattr(args, key) is not None:  # None: not fitted yet
            raise common.UserError(f"--out {args.out}: written with --{key.replace('_', '-')} {before.get(key)}, "
                                   f"not {getattr(args, key)}; resume with the same flags, or use --overwrite or "
                                   "another --out")


def check_prompts(prompts, examples, out):
    """Each done prompt must still be the prompt at its line of --data: records are matched
    to prompts by index, so an edited data file would pair samples with the wrong prompt."""
    for i, (line, _) in prompts.items():
        before = json.loads(line)["prompt"]
        if i < len(examples) and before != examples[i]["prompt"]:
            raise common.UserError(f"--out {out}: prompt {i} was {before[:60]!r} but {examples[i]['_where']} is "
                                   f"{examples[i]['prompt'][:60]!r}; --data changed since, so use --overwrite or "
                                   "another --out")


def remove(paths):
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def resume_files(args, files, examples, rank, world):
    """Repair and resume what an earlier run left -> the indices of the prompts already done.
    Process 0 folds into the main pair every shard it can see (left by a killed torchrun run);
    then under torchrun each process resumes its own shard pair, which may be on a disk
    process 0 cannot see."""
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    main_done = None
    if rank == 0:
        if args.overwrite:
            remove([files["kept"], files["pass"], files["report"]] +
                   [path for pair in shard_files(files["base"]) for path in pair])
        write_atomic(files["run"], json.dumps(vars(args), indent=2) + "\n")
        prompts = read_pair(files["kept"], files["pass"])
        shards = shard_files(files["base"])
        for kept_path, pass_path in shards:
            for i, lines in read_pair(kept_path, pass_path).items():
                prompts.setdefault(i, lines)
        check_prompts(prompts, examples, args.out)
        write_pair(files["kept"], files["pass"], prompts)
        remove([path for pair in shards for path in pair])
        main_done = sorted(prompts)
    if world == 1:
        return set(main_done)
    box = [main_done]
    dist.broadcast_object_list(box, src=0)  # also a barrier: no shard is touched before the fold
    if args.overwrite:
        remove([files["kept_shard"], files["pass_shard"]])
    own = read_pair(files["kept_shard"], files["pass_shard"])
    check_prompts(own, examples, args.out)
    write_pair(files["kept_shard"], files["pass_shard"], own)
    return set(box[0]) | set(own)


# ----------------------------------------------------------------------------------------
# the run


def run(args):
    # objects only, over gloo: no GPU collective, no shared disk. The timeout is long
    # because process 0 waits at the end for the slowest process to finish sampling.
    rank, world, device = distributed.init_distributed(args.device, backend="gloo", timeout_hours=24 * 7)

    def to_rank0(obj):
        """Every process's obj, in rank order, on process 0 (None on the others)."""
        if world == 1:
            return [obj]
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    files = None if args.eval_only else output_paths(args.out, rank, world)
    if files and rank == 0:
        check_flags(files, args)  # before the model loads: a mistake costs seconds, not minutes
    dtype = common.pick_dtype(args.dtype, device)
    rewards = R.parse_rewards(args.rewards)
    names = [name for name, _, _ in rewards]
    correct_name = next(name for name in names if name in CORRECT)
    k, P = args.num_samples, args.prompts_per_batch

    # model and data
    model, tok = models.load_model(args.model, device, dtype)  # no training: weights in the compute dtype
    eos, context = models.eos_ids(model, tok), getattr(model.config, "max_position_embeddings", None)
    need = sorted({R.NEEDS[name] for name in names if name in R.NEEDS})
    examples, prompt_ids = common.load_prompts(args.data, tok, args.template, need, args.max_prompts)
    args.max_new_tokens = common.fit_max_new_tokens(args.max_new_tokens, context, examples, prompt_ids)
    if files and rank == 0:
        check_flags(files, args, ["max_new_tokens"])  # as fitted: the samples written before must be as long
    for ex in examples:  # checked now, not when a sample of that prompt first needs it
        if ex.get("lang") and ex["lang"] not in R.SCRIPTS:
            raise common.UserError(f"{ex['_where']}: unknown language {ex['lang']!r} (known: {', '.join(sorted(R.SCRIPTS))})")

    done = resume_files(args, files, examples, rank, world) if files else set()  # prompts done earlier

    mine = [i for i in range(len(examples)) if i % world == rank]  # this process's prompts
    if rank == 0:
        earlier = len(done & set(range(len(examples))))
        print(f"{len(examples)} prompts x {k} samples from {args.model} on {device} in "
              f"{str(dtype).removeprefix('torch.')}, {world} process(es), temperature {args.temperature}, "
              f"top-p {args.top_p}, up to {args.max_new_tokens} new tokens"
              + (f"; {earlier} prompts done by an earlier run" if earlier else ""))

    # the loop: sample a batch, score it, judge each prompt, append its lines
    warn = lambda message: tqdm.write(message if world == 1 else f"[process {rank}] {message}", file=sys.stderr)  # noqa: E731
    session = []  # pass records of the prompts this process judged in this run
    bar = common.progress(None, total=len(mine), initial=sum(i in done for i in mine),
                          desc="prompts" if world == 1 else "prompts of process 0")
    with ThreadPoolExecutor(P) as pool:  # the majority votes of a batch's prompts wait on math workers together
        for start in range(0, len(mine), P):
            batch = mine[start:start + P]
            todo = [j for j, i in enumerate(batch) if i not in done]
            if not todo:
                continue
            # the whole batch is sampled even when part of it is done, so that its random
            # numbers, seeded by --seed and its first prompt, are those of an uninterrupted run
            seed = int(np.random.SeedSequence([args.seed, batch[0]]).generate_state(1)[0])
            generator = torch.Generator(device=device).manual_seed(seed)
            rows = sampling.rollout(model, tok, [examples[i] for i in batch], [prompt_ids[i] for i in batch], k,
                                    args.max_new_tokens, args.temperature, args.top_p, eos, R.scorer(rewards),
                                    generator, {"lang": args.lang}, warn)  # (P*k,) rows, prompt-major
            judged = list(pool.map(lambda j: judge_prompt(batch[j], examples[batch[j]], rows[j * k:(j + 1) * k],
                                                          args, correct_name), todo))
            if files:
                kept_path, pass_path = (files["kept"], files["pass"]) if world == 1 else \
                    (files["kept_shard"], files["pass_shard"])
                append_lines(kept_path, [line for _, lines in judged for line in lines])
                append_lines(pass_path, [rec for rec, _ in judged])  # written last: marks the prompts done
            session += [rec for rec, _ in judged]
            bar.update(len(todo))
            bar.set_postfix({"pass@1": f"{np.mean([r['pass_rate'] for r in session]):.3f}",
                             "kept": sum(r["num_kept"] for r in session)})
    bar.close()

    # gather every prompt's record on process 0; with files, process 0 rewrites the main pair
    # ordered by prompt, merging the shards of the other processes (or, for one process, only
    # putting in order prompts a folded torchrun run had left behind)
    records = []
    if files is None:
        parts = to_rank0(session)
        if rank == 0:
            records = sorted((r for part in parts for r in part), key=lambda r: r["prompt_index"])
    else:
        parts = to_rank0({} if world == 1 else read_pair(files["kept_shard"], files["pass_shard"]))
        if rank == 0:
            prompts = read_pair(files["kept"], files["pass"])
            for part in parts:
                for i, lines in part.items():
                    prompts.setdefault(i, lines)
            if world > 1 or list(prompts) != sorted(prompts):  # one process appends in order: no rewrite
                write_pair(files["kept"], files["pass"], prompts)
            records = [json.loads(prompts[i][0]) for i in sorted(prompts)]
        if world > 1:
            dist.barrier()  # the merged pair is on disk: the shards can go
            remove([files["kept_shard"], files["pass_shard"]])
    distributed.end_distributed()  # every process past the removal, then the group is left
    if rank != 0:
        return None

    # the report: over every prompt the files hold (a finished run's prompts, and more if
    # --max-prompts shrank since), or with --eval-only over this run's prompts
    report = summarize(records, args.rl_range)
    print("\n".join(report_lines(report, args.rl_range)))
    write_outputs(args, files, records, report)
    return report


def write_outputs(args, files, records, report):
    """The run's last files, each said in a line: --report's json, the report beside the kept
    samples (with the sft.py command that trains on them, or why there are none), --rl-out."""
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        write_atomic(args.report, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.report}")
    if files:
        write_atomic(files["report"], json.dumps(report, indent=2) + "\n")
        if report["kept"]:
            print(f"wrote {files['kept']} ({report['kept']} samples from {report['prompts_kept']} prompts) and "
                  f"{files['pass']}; train on them with python sft.py --data {files['kept']} --template "
                  f"{args.template} ...")
        else:  # an empty file is no SFT data: say why nothing was kept, not how to train on it
            print(f"kept no sample: {files['kept']} is empty (dropped: "
                  + ", ".join(f"{why} {n}" for why, n in report["dropped"].items() if n) + f"); wrote {files['pass']}")
    if args.rl_out:
        lo, hi = args.rl_range
        picked = [r for r in records if lo < r["pass_rate"] < hi]
        os.makedirs(os.path.dirname(os.path.abspath(args.rl_out)), exist_ok=True)
        write_atomic(args.rl_out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in picked))
        print(f"wrote {args.rl_out}: {len(picked)} prompts with {lo} < pass rate < {hi}")


def print_samples(args):
    """--prompt: the --num-samples completions of each prompt, printed as the model wrote them."""
    device = common.pick_device(args.device)
    model, tok = models.load_model(args.model, device, common.pick_dtype(args.dtype, device))
    eos, context = models.eos_ids(model, tok), getattr(model.config, "max_position_embeddings", None)
    prompt_ids = [common.encode_prompt(text, tok, args.template) for text in args.prompt]
    args.max_new_tokens = common.fit_max_new_tokens(args.max_new_tokens, context, [
        {"_where": f"--prompt {text[:60]!r}"} for text in args.prompt], prompt_ids)
    for i, (text, ids) in enumerate(zip(args.prompt, prompt_ids)):
        # seeded by --seed alone, so a prompt's samples do not depend on the prompts before it
        generator = torch.Generator(device=device).manual_seed(args.seed)
        out = sampling.sample(model, [ids], args.num_samples, args.max_new_tokens, eos, tok.pad_token_id,
                              args.temperature, args.top_p, generator, vocab=len(tok))
        n, cut = out["mask"].sum(1).tolist(), out["truncated"].tolist()  # n: tokens, the end token included
        for j, row in enumerate(out["ids"].tolist()):
            print(f"--- prompt {i + 1}, sample {j + 1}: {n[j]} tokens{', truncated' if cut[j] else ''}: {text[:60]!r}")
            # the end token dropped; other special tokens the model wrote (a chat turn's markers) stay
            print(tok.decode(row[:n[j] - (not cut[j])]), flush=True)


def main(argv=None):
    args = get_args(argv)
    with common.user_errors("interrupted" if args.prompt or args.eval_only else
                            "interrupted; the same command goes on after the prompts already written"):
        return print_samples(args) if args.prompt else run(args)


if __name__ == "__main__":
    main()
