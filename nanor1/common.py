"""What every script needs: errors, printing, device and dtype, runs, prompts.

One topic a header: errors a user can fix; device and dtype, decided in one place; a run's
seeds, logs, learning rate, optimizer step and bad-step guard; jsonl files; prompt templates
and their encoding. Several processes (torchrun) and FSDP2 are distributed.py, where models
come from is models.py, sampling is sampling.py, checkpoints are checkpoints.py.
"""

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time

import numpy as np
import torch
from tqdm import tqdm

# ----------------------------------------------------------------------------------------
# errors and output: one clear message, caught by each script's main() and printed without
# a traceback; flags checked by range; printing from process 0 alone


class UserError(Exception):
    """Bad input from the user (a model, a file, a line, a flag); the message says which."""


def short_errors(parser):
    """`parser` with argparse's errors as one line, without the usage block (--help shows it),
    and under torchrun from process 0 alone (each process parses the same flags)."""
    def error(message):
        exit_with(f"error: {message} (--help lists the flags)", 2)
    parser.error = error
    return parser


def exit_with(message, code=1):
    """End the process with one line on stderr, from process 0 alone (torchrun's processes all fail
    alike). Exit code 1 is SystemExit(message), which Python prints; other codes print, then exit."""
    if int(os.environ.get("RANK", "0")):
        sys.exit(code)
    if code == 1:
        sys.exit(message)
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


INTERRUPTED = "interrupted; the same command with --resume goes on from the newest checkpoint of --out, if any"


@contextlib.contextmanager
def user_errors(interrupted=INTERRUPTED):
    """A script's main(): an error the user can fix as one line, no traceback (exit code 1), and
    Ctrl-C before a run's first step, or a second one after, as the line `interrupted` (exit code
    130, as a shell's)."""
    try:
        yield
    except UserError as e:
        exit_with(f"error: {e}")
    except KeyboardInterrupt:
        exit_with(interrupted, 130)


def check_ranges(parser, args, at_least_1=(), at_least_0=()):
    """Stop with parser.error naming the first flag (an attribute of args) below its bound
    (None, a default decided later, passes)."""
    for names, bound in [(at_least_1, 1), (at_least_0, 0)]:
        for name in names:
            value = getattr(args, name)
            if value is not None and value < bound:
                words = f">= {bound}" if isinstance(value, float) else "at least 1" if bound else "0 or more"
                parser.error(f"--{name.replace('_', '-')} must be {words}")


def print0(message, file=None):
    """Print on process 0 alone (the others stay quiet), above the progress bar when one runs,
    at once (a log file that is followed with tail -f sees each line as it comes); to stdout,
    or to `file`."""
    if int(os.environ.get("RANK", "0")) == 0:
        file = file or sys.stdout
        tqdm.write(str(message), file=file)
        file.flush()


def warn0(message):
    """print0 for a warning: on stderr, so that stdout stays the run's log, one line a step."""
    print0(message, file=sys.stderr)


def progress(iterable, **kwargs):
    """A tqdm bar on process 0 when both output streams are a terminal; none when they go to a
    file or a pipe (`> log`, `| tee`), where the bar's redraws would share lines with the log."""
    terminal = sys.stdout.isatty() and sys.stderr.isatty()
    return tqdm(iterable, dynamic_ncols=True, disable=int(os.environ.get("RANK", "0")) > 0 or not terminal, **kwargs)


# ----------------------------------------------------------------------------------------
# device and dtype, decided in one place


def pick_device(name="auto"):
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name}: not a device (auto, cpu, cuda, cuda:1, mps)") from None
        if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
            raise UserError(f"--device {name}: no such CUDA device on this machine")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"--device {name}: MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name, device):
    """The compute dtype: bf16 on CUDA (when supported), fp32 elsewhere, unless the flag says."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def clock(device):
    """The time now, once the device's queued work has run (a GPU runs kernels asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def autocast(device, dtype):
    """Mixed precision: weights stay float32, matmuls run in `dtype`; nothing at float32.

    Weights trained in bf16 lose small updates: at lr 1e-6 an update is far below bf16's
    resolution (about 0.4% of a weight), so AdamW would leave them unchanged.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)

# ----------------------------------------------------------------------------------------
# a run: seeds, the output folder's logs, the learning rate, the update's end and the
# bad-step guard


def start_run(args):
    """A training run's set-up -> (rank, world, device, dtype): seeds, torchrun's process group
    when there is one, device and compute dtype, and the output folder (claim_out)."""
    from nanor1.distributed import init_distributed  # here: distributed.py leans on this module

    seed_everything(args.seed)
    rank, world, device = init_distributed(args.device)
    claim_out(args.out, args.resume, args.overwrite)
    return rank, world, device, pick_dtype(args.dtype, device)


def run_files(out):
    """The files and folders of a run in `out` (its flags, logs and checkpoints; half-written
    ones too); nothing else in the folder belongs to the run."""
    if not os.path.isdir(out):
        return []
    return sorted(f for f in os.listdir(out) if f in ("args.json", "metrics.jsonl", "samples.jsonl")
                  or f.startswith(("step-", ".tmp-step-", ".old-step-")))


def claim_out(out, resume, overwrite):
    """--out for a run: a new run is refused a folder that holds one (its checkpoints would be
    overwritten and its logs mixed with the new ones), unless --resume goes on with it or
    --overwrite starts over (open_run removes the old files, once the model and data have loaded)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: exists and is not a folder")
    found = run_files(out)
    if found and not resume and not overwrite:
        if not any(f.startswith("step-") for f in found):  # stopped before its first checkpoint
            raise UserError(f"--out {out} holds the logs of a run with no checkpoint ({', '.join(found)}); "
                            "add --overwrite to start over (they are removed)")
        raise UserError(f"--out {out} holds a run ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}); "
                        "add --resume to go on with it, or --overwrite to start over (its files are removed)")


@contextlib.contextmanager
def stop_signals():
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice) -> a dict `stop`. Until the run sets
    stop["armed"] (its first step), a signal interrupts at once: nothing is saved yet. After, the
    first asks the run to stop at the end of the step under way, with a checkpoint ("at" in
    stop), and a second one stops at once (KeyboardInterrupt). The previous handlers come
    back on leaving. (Signals reach only the main thread: elsewhere nothing is caught.)"""
    stop = {}

    def ask(signum, frame):
        if not stop.get("armed") or "at" in stop:
            raise KeyboardInterrupt
        stop["at"] = True
        if int(os.environ.get("RANK", "0")) == 0:  # os.write: print() here could re-enter a write under way
            os.write(2, f"{signal.Signals(signum).name}: stopping at the end of this step, with a checkpoint "
                        "(again to stop at once)\n".encode())

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    before = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def stopped(step, path, flags):
    """The line a run that a signal stopped ends with: where its last checkpoint is, and how to go on."""
    print0(f"stopped after step {step}; its checkpoint is {path}: " +
           (f"go on with the same command plus --resume{' (and without --overwrite)' if flags['overwrite'] else ''}"
            if flags["save_optimizer"] else "the weights alone (--save-optimizer 0), so the run cannot go on exactly"))


def check_not_finished(state, num_steps, path):
    """--resume from a checkpoint of the last step: nothing to do, said before anything is written."""
    if state and state["step"] >= num_steps:
        raise UserError(f"--resume {path}: the run finished at step {state['step']} of {num_steps}; "
                        "raise --num-steps to go on")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_run(out, flags, wandb_project=None, header=None, rank=0):
    """Create the output folder, write the flags (args.json and the first metrics.jsonl record,
    with `header`), start wandb when asked -> (log, finish): log(step, record) appends a
    record to metrics.jsonl (and wandb); finish() closes wandb. Only process 0 writes: in
    the others both do nothing. Under --overwrite (in flags) the old run's files go first."""
    if flags.get("overwrite") and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process has loaded its model (which may be in --out) first
    if rank:
        return (lambda *a: None), (lambda: None)
    for f in run_files(out) if flags.get("overwrite") else []:
        path = os.path.join(out, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(flags, f, indent=2)
    metrics_path = os.path.join(out, "metrics.jsonl")
    append_jsonl(metrics_path, {"args": flags, **(header or {})})
    wandb = None
    if wandb_project:
        try:
            import wandb  # optional dependency, imported only when asked for
        except ImportError:
            raise UserError("--wandb-project: wandb is not installed (pip install wandb)") from None
        wandb.init(project=wandb_project, config=flags)

    def log(step, record):
        append_jsonl(metrics_path, record)
        if wandb:
            wandb.log(record, step=step)

    def finish():
        if wandb:
            wandb.finish()

    return log, finish


def lr_at(step, num_steps, lr, warmup, min_ratio, schedule="cosine"):
    """The learning rate of step `step` (from 1): a linear warm-up over `warmup` steps, then
    constant, or a linear or cosine decay to min_ratio * lr at num_steps (min_ratio 1: constant)."""
    if step <= warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(1, num_steps - warmup)  # 0 after the warm-up, 1 at the last step
    decay = {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]
    return lr * (min_ratio + (1 - min_ratio) * decay)


def optimizer_step(model, opt, max_norm, step):
    """The end of an update: sum the gradients over the processes, clip them, step -> the norm
    before clipping. A non-finite norm (from a non-finite loss) skips the step and says so."""
    from nanor1.distributed import clip_gradients, sum_gradients

    sum_gradients(model)  # every process now holds the whole batch's gradient
    gnorm = clip_gradients(model, max_norm)
    if math.isfinite(gnorm):
        opt.step()
    else:
        warn0(f"warning: step {step}: gradient norm is {gnorm}; update skipped")
        opt.zero_grad(set_to_none=True)
    return gnorm


def stop_if_bad(bad_steps, limit):
    """--max-bad-steps: stop a run whose last `limit` steps were all skipped (0: never)."""
    if limit and bad_steps >= limit:
        raise UserError(f"--max-bad-steps {limit}: the last {bad_steps} steps had a non-finite loss or gradient "
                        "and were skipped; stopping. Lower --lr, or --resume from a checkpoint before the trouble")

# ----------------------------------------------------------------------------------------
# jsonl files


def read_jsonl(path, required=("prompt",)):
    """Read a jsonl file into a list of dicts; errors name the file and line.

    Each record gets "_where" = "file:line" so later errors can point at it.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{n}: not UTF-8 text (byte {e.start + 1})") from None
            if not line.strip():
                continue
            text = line.rstrip("\r\n")  # columns counted on the line itself, not past its end
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                where = (f"; the line ends at column {len(text)}, the JSON unfinished" if e.pos >= len(text)
                         else f" at column {e.colno}")
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}{where})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if key not in row:
                    raise UserError(f"{path}:{n}: missing field '{key}'")
                if isinstance(row[key], (int, float)) and not isinstance(row[key], bool):
                    row[key] = str(row[key])  # an answer written as a number: 72 -> "72"
                if not isinstance(row[key], str):
                    raise UserError(f"{path}:{n}: field '{key}' must be a string, not {type(row[key]).__name__}")
            row["_where"] = f"{path}:{n}"
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no records")
    return rows


def append_jsonl(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")

# ----------------------------------------------------------------------------------------
# prompts: the one formatting and encoding every script uses, and the seeded order a
# training run draws them in


# DeepSeek-R1-Zero's template (Table 1 of the R1 paper) for base models.
R1_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {prompt} Assistant:"
)


def format_prompt(prompt, tok, template="r1"):
    """The text the model is given: R1-Zero template, the tokenizer's chat template, or raw.
    `prompt` is the user's text, or (chat template only) a list of chat messages that ends
    before the assistant's turn.

    Some chat templates (DeepSeek-R1-Distill, Qwen3) end the prompt with an opened
    `<think>`; the completion would then never contain it and the format reward would
    score every sample 0. We cut it off so the model writes the tag itself.
    """
    if not isinstance(prompt, str) and template != "chat":
        raise UserError(f"--template {template}: a conversation of several turns needs --template chat")
    if template == "r1":
        prompt = prompt.strip()
        text = R1_TEMPLATE.format(prompt=prompt if prompt[-1:] in ".?!" else prompt + ".")
    elif template == "chat":
        if not getattr(tok, "chat_template", None):
            raise UserError("--template chat: this tokenizer has no chat template; use r1 or raw")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    elif template == "raw":
        text = prompt
    else:
        raise UserError(f"--template {template}: expected r1, chat or raw")
    stripped = text.rstrip()
    if stripped.endswith("<think>") and stripped.count("<think>") > stripped.count("</think>"):
        text = stripped[: -len("<think>")]
    return text


def encode_prompt(prompt, tok, template="r1"):
    """Token ids of the formatted prompt: the one encoding every script uses, so a model
    fine-tuned by sft.py sees at RL and evaluation time exactly the tokens it was trained on."""
    text = format_prompt(prompt, tok, template)
    # chat templates already contain the model's begin-of-text token
    return tok(text, add_special_tokens=template != "chat")["input_ids"]


def load_prompts(path, tok, template, need=(), limit=0):
    """Read a jsonl file of prompts and encode them -> (examples, prompt ids); whether they fit
    the model's context with the completions after them is fit_max_new_tokens' to check.
    need: fields besides "prompt" every line must have (the rewards' "answer", "tests").
    limit: keep the first `limit` prompts (0: all), once every line has been checked."""
    examples = read_jsonl(path, required=("prompt", *need))
    ids = []
    for ex in examples:
        ids.append(encode_prompt(ex["prompt"], tok, template))
        if not ids[-1]:
            raise UserError(f"{ex['_where']}: the prompt is empty")
    return (examples[:limit], ids[:limit]) if limit else (examples, ids)


MAX_NEW_TOKENS = 1024  # --max-new-tokens when left out and the model's context has room


def fit_max_new_tokens(requested, context, examples, ids, default=MAX_NEW_TOKENS):
    """--max-new-tokens -> the number a run uses. Given: it, once every prompt fits the model's
    context with that many tokens after it (an error names the line of one that does not).
    Left out (None): `default`, lowered to what the context leaves after the longest prompt,
    and said (a small model's context is often shorter than a long reasoning trace)."""
    if requested is None:
        if not context or not ids:
            return default
        longest = max(range(len(ids)), key=lambda i: len(ids[i]))
        room = context - len(ids[longest])
        if room < 1:
            raise UserError(f"{examples[longest]['_where']}: the prompt is {len(ids[longest])} tokens; the model's "
                            f"context of {context} leaves no room for a completion")
        if room < default:
            print0(f"--max-new-tokens {room}: what the model's context of {context} tokens leaves after the longest "
                   f"prompt ({examples[longest]['_where']}, {len(ids[longest])} tokens), not {default}")
        return min(default, room)
    if context and requested >= context:
        raise UserError(f"--max-new-tokens {requested} leaves no room for a prompt in the model's "
                        f"context of {context} tokens")
    for ex, p in zip(examples, ids):
        if context and len(p) + requested > context:
            raise UserError(f"{ex['_where']}: the prompt is {len(p)} tokens; with --max-new-tokens "
                            f"{requested} it does not fit the model's context of {context} tokens")
    return requested


def load_rl_data(args, tok, model, need):
    """An RL run's training prompts and held-out ones, formatted and encoded -> (examples, ids,
    eval examples, eval ids). need: the fields every line must carry for the rewards ("answer",
    "tests"). Sets args.max_new_tokens to what the model's context allows, and the overlong
    penalty's buffer args.overlong_buffer to a fifth of it when not given (DAPO: 4096 of 20480)."""
    context = getattr(model.config, "max_position_embeddings", None)
    examples, ids = load_prompts(args.data, tok, args.template, need)
    eval_examples, eval_ids = (load_prompts(args.eval_data, tok, args.template, ["answer"], args.eval_prompts)
                               if args.eval_data else ([], []))
    print0(f"{len(examples)} training prompts from {args.data}, {len(eval_examples)} eval prompts")
    args.max_new_tokens = fit_max_new_tokens(args.max_new_tokens, context, examples + eval_examples, ids + eval_ids)
    if args.overlong_buffer is None:
        args.overlong_buffer = args.max_new_tokens // 5
    elif args.overlong_buffer > args.max_new_tokens:
        raise UserError(f"--overlong-buffer {args.overlong_buffer} is more than --max-new-tokens "
                        f"{args.max_new_tokens}, which the model's context allows")
    return examples, ids, eval_examples, eval_ids


def next_prompts(num_examples, state, k, seed):
    """k example indices from a seeded per-epoch shuffle; state {"epoch", "pos"} is advanced
    (a checkpoint keeps it, so a resumed run draws what the uninterrupted one would have)."""
    out = []
    while len(out) < k:
        order = np.random.default_rng(seed + state["epoch"]).permutation(num_examples)
        take = order[state["pos"]: state["pos"] + k - len(out)].tolist()
        out += take
        state["pos"] += len(take)
        if state["pos"] >= num_examples:
            state["epoch"], state["pos"] = state["epoch"] + 1, 0
    return out


def quantile(x, q):
    """The q-quantile of the 1-D tensor x, interpolated linearly as torch.quantile does, but
    by a sort: torch.quantile refuses more than 2**24 values (R1-Zero's 512 x 32768 tokens)."""
    x = x.sort().values
    pos = q * (len(x) - 1)
    lo = int(pos)
    return x[lo] + (x[min(lo + 1, len(x) - 1)] - x[lo]) * (pos - lo)
