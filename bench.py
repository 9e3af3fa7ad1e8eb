"""Time GRPO steps: grpo.py's own loop, with every completion sampled to --max-new-tokens
(grpo.py --ignore-eos), so that runs compare equal work. Prints the median seconds a step
spends sampling, scoring, on the reference's log-probs and on the update, the generated
tokens a second, and the peak memory: the process's peak RSS on CPU, torch's peak
allocation on CUDA.

--peer trl runs the same workload through TRL's GRPOTrainer (pip install trl, best in its
own virtual environment): the same model files, prompts, group, prompts per step,
completion length (forced with min_new_tokens), beta, reward, precision, one update per
batch of samples, no gradient checkpointing. --compare runs both, each run in a fresh
process, alternating which goes first, and prints the medians over runs: the machine is
noisy, and one run of each proves little.

Deliberate simplifications: the prompts are short arithmetic questions without a template
(--template raw) without answers (grpo.py would also check and log accuracy) and the reward
is the format rule, cheap and the same on both sides; the
models are built from a size preset with random weights (or loaded from --model).

    python bench.py --model tiny --group 8 --prompts-per-step 4 --max-new-tokens 64 --device cpu
    python bench.py --model 40m --dtype bfloat16 --device cpu
    python bench.py --model SmolLM2-135M-Instruct.Q4_1.gguf --prompts-per-step 2 --sample-dtype bfloat16 --device cpu
    python bench.py --model qwen2.5-0.5b --group 16 --max-new-tokens 512          (on a GPU)
    python bench.py --compare --peer-python ../trl-venv/bin/python --runs 5 --model tiny --device cpu

Unlike the training scripts, bench.py imports grpo.py: it times the real loop, not a copy.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import rewards as R
from nanor1 import common, models

# model size presets (Qwen2 layout): hidden, layers, query heads, key/value heads, MLP width, vocabulary
SIZES = {
    "tiny": dict(hidden=128, layers=2, heads=4, kv_heads=2, mlp=256),  # 0.35M parameters, the tiny tokenizer's 388 tokens
    "40m": dict(hidden=512, layers=8, heads=8, kv_heads=2, mlp=2816),  # ~40M parameters
    "qwen2.5-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, mlp=4864, vocab=151936),  # Qwen2.5-0.5B's shape
}
PHASES = ["sample_s", "score_s", "ref_s", "update_s"]


def get_args(argv=None):
    p = common.short_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    p.add_argument("--model", default="tiny",
                   help=f"a size preset with random weights ({', '.join(SIZES)}), or a model grpo.py loads")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype: float32, or bfloat16 autocast (weights stay float32 in nanoR1)")
    p.add_argument("--sample-dtype", default="same", choices=["same", "bfloat16"],
                   help="grpo.py's --sample-dtype: sample with the trained weights, or from a bfloat16 copy "
                        "(nanoR1 only)")
    p.add_argument("--group", type=int, default=8, help="completions per prompt, G")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per step, P")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens sampled for every completion")
    p.add_argument("--beta", type=float, default=0.04, help="KL weight; 0 = no reference model")
    p.add_argument("--micro-batch-size", type=int, default=8,
                   help="nanoR1's completions per forward/backward pass (grpo.py's default; TRL takes the step's P*G at once)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="steps run before the timed ones (allocation, caches)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--seed", type=int, default=0, help="seed for the model's weights and the sampling")
    p.add_argument("--peer", default="nanor1", choices=["nanor1", "trl"], help="whose GRPO step to time")
    p.add_argument("--compare", action="store_true", help="time nanoR1 and --peer-python's TRL, interleaved, --runs times")
    p.add_argument("--runs", type=int, default=5, help="with --compare: runs of each side")
    p.add_argument("--peer-python", default=sys.executable, help="with --compare: the Python that has trl installed")
    p.add_argument("--json", action="store_true", help="print one JSON line of results (what --compare reads)")
    p.add_argument("--work-dir", default=None, help="where the model and prompts are written; default a new temporary folder")
    args = p.parse_args(argv)
    common.check_ranges(p, args, ["group", "prompts_per_step", "max_new_tokens", "steps", "runs", "micro_batch_size"],
                        ["warmup", "threads"])
    if args.group < 2:
        p.error("--group must be at least 2")
    return args


# ----------------------------------------------------------------------------------------
# the workload: a model folder and a prompt file both sides read


def prepare(args, work):
    """Write the model (a preset's random weights, or nothing for a given model) and the
    prompts under `work` -> (model path, prompts path)."""
    model_dir = args.model
    if args.model in SIZES:
        model_dir = os.path.join(work, f"model-{args.model}-seed{args.seed}")
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            tok = models.build_tiny_tokenizer()
            size = SIZES[args.model]
            model = models.new_model(tok, max_positions=4096, seed=args.seed, **size)
            model.save_pretrained(model_dir)
            tok.save_pretrained(model_dir)
    data = os.path.join(work, "prompts.jsonl")
    with open(data, "w") as f:
        for i in range(64):
            a, b = (37 * i) % 100, (53 * i) % 100
            f.write(json.dumps({"prompt": f"What is {a} + {b}?"}) + "\n")  # no answer: no accuracy to log
    return model_dir, data


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------
# nanoR1: grpo.py's train(), with its own per-phase timings from metrics.jsonl


def run_nanor1(args, model_dir, data, device, work):
    import grpo  # the real loop

    out = tempfile.mkdtemp(dir=work, prefix="nanor1-")
    history = grpo.main([
        "--model", model_dir, "--data", data, "--out", out, "--template", "raw", "--rewards", "format",
        "--ignore-eos", "--group", str(args.group), "--prompts-per-step", str(args.prompts_per_step),
        "--max-new-tokens", str(args.max_new_tokens), "--beta", str(args.beta), "--lr", "1e-6",
        "--micro-batch-size", str(args.micro_batch_size),
        "--num-steps", str(args.warmup + args.steps), "--device", str(device), "--dtype", args.dtype,
        "--sample-dtype", args.sample_dtype, "--seed", str(args.seed), "--sample-every", "0",
        "--save-every", str(10**9)])
    timed = history[args.warmup:]
    tokens = args.prompts_per_step * args.group * args.max_new_tokens
    if any(r["len"] != args.max_new_tokens for r in timed):
        raise RuntimeError("a completion ended before --max-new-tokens: the runs would not compare equal work")
    result = {"side": "nanor1", "step_s": statistics.median(r["s"] for r in timed)}
    for k in PHASES:
        result[k] = statistics.median(r[k] for r in timed)
    result["tok/s"] = tokens / statistics.median(r["sample_s"] for r in timed)  # sampling's own rate
    return result


# ----------------------------------------------------------------------------------------
# the peer: TRL's GRPOTrainer on the same workload


def run_trl(args, model_dir, data, device, work):
    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise common.UserError(f"--peer trl: {e.name} is not installed in {sys.executable} (pip install trl, best in "
                               "a virtual environment of its own, then --compare --peer-python ITS_PYTHON)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    fmt = R.parse_rewards("format")

    def format_reward(completions, **kwargs):  # the same rule nanoR1 scores with
        return [total for total, _, _ in R.score_many(completions, [{} for _ in completions], fmt)]

    starts = []

    class StepTimer(TrainerCallback):  # TRL's loop is its trainer's: a callback is the way in
        def on_step_begin(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            starts.append(time.time())

        def on_step_end(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            starts[-1] = time.time() - starts[-1]

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = [json.loads(line)["prompt"] for line in open(data)]
    G, P, T = args.group, args.prompts_per_step, args.max_new_tokens
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(dir=work, prefix="trl-"), report_to="none", save_strategy="no", logging_steps=1,
        per_device_train_batch_size=P * G, gradient_accumulation_steps=1, num_generations=G,  # P prompts x G
        max_completion_length=T, generation_kwargs={"min_new_tokens": T},  # every completion T tokens long
        beta=args.beta, learning_rate=1e-6, max_steps=args.warmup + args.steps, num_iterations=1,
        loss_type="grpo", scale_rewards="group", temperature=1.0, top_p=1.0, seed=args.seed,
        bf16=args.dtype == "bfloat16", fp16=False, gradient_checkpointing=False,  # TRL's defaults: bf16 on, checkpointing on
        use_cpu=device.type == "cpu", disable_dropout=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[format_reward], args=config, processing_class=tok,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[StepTimer()])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    if not lengths or any(n != T for n in lengths):
        raise RuntimeError(f"TRL's completions were not all {T} tokens long ({lengths}): not equal work")
    return {"side": "trl", "step_s": statistics.median(starts[args.warmup:])}


# ----------------------------------------------------------------------------------------
# one run, or both sides interleaved


def run_once(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-")
    model_dir, data = prepare(args, work)
    run = run_trl if args.peer == "trl" else run_nanor1
    result = run(args, model_dir, data, device, work)
    result.update({"peak_mib": peak_memory_mib(device), "model": args.model, "dtype": args.dtype,
                   "device": str(device), "threads": torch.get_num_threads()})
    return result


def compare(args, argv):
    """--runs runs of each side, each in a fresh process, alternating which goes first."""
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-")
    prepare(args, work)  # once, so that both sides read the same model files
    base = [a for a in argv if a not in ("--compare", "--json")]
    results = {"nanor1": [], "trl": []}
    for r in range(args.runs):
        for side in (["nanor1", "trl"] if r % 2 == 0 else ["trl", "nanor1"]):
            python = args.peer_python if side == "trl" else sys.executable
            cmd = [python, os.path.abspath(__file__), *base, "--peer", side, "--json", "--work-dir", work]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"error: {side} run {r + 1} failed:\n{done.stderr[-3000:]}")
            results[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"run {r + 1} {side}: {results[side][-1]['step_s']:.3f} s/step, "
                  f"peak {results[side][-1]['peak_mib']:.0f} MiB", flush=True)
    med = {side: {k: statistics.median(x[k] for x in rs) for k in ["step_s", "peak_mib"]} for side, rs in results.items()}
    ratio = med["nanor1"]["step_s"] / med["trl"]["step_s"]
    print(f"\n{args.model}, {args.dtype}, G {args.group} x P {args.prompts_per_step} x {args.max_new_tokens} tokens, "
          f"beta {args.beta}, medians of {args.runs} runs of {args.steps} steps")
    print("| side | s/step | peak MiB |\n|---|---|---|")
    for side in ["nanor1", "trl"]:
        print(f"| {side} | {med[side]['step_s']:.3f} | {med[side]['peak_mib']:.0f} |")
    print(f"nanoR1 / TRL step time: {ratio:.2f}x")
    return med


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_args(argv)
    if args.compare:
        return compare(args, argv)
    with common.user_errors("interrupted"):
        result = run_once(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"\n{result['model']} on {result['device']} ({result['dtype']}, {result['threads']} threads), G {args.group} x "
              f"P {args.prompts_per_step} x {args.max_new_tokens} tokens, beta {args.beta}: median of {args.steps} steps")
        parts = " | ".join(f"{k[:-2]} {result[k]:.3f}" for k in PHASES if k in result)
        print(f"step {result['step_s']:.3f} s" + (f" ({parts})" if parts else "")
              + (f" | sampling {result['tok/s']:.0f} tok/s" if "tok/s" in result else "")
              + f" | peak {result['peak_mib']:.0f} MiB")
    return result


if __name__ == "__main__":
    main()
