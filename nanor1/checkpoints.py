"""Checkpoints and exact resume: what a run writes so that a resumed run trains as if never stopped.

A checkpoint is a Hugging Face folder (model, tokenizer, the run's flags in args.json),
written under a temporary name and renamed, plus trainer_state.pt: the optimizer, the step,
every random state of every process and what else the script hands over (the data order,
a moved reference model). Each script passes the list of its flags that a resumed run must
repeat to train exactly as the uninterrupted one.
"""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from nanor1.common import UserError, print0, warn0
from nanor1.distributed import all_gather, full_state_dict, is_sharded
from nanor1.models import is_lora, merged_state_dict

# ----------------------------------------------------------------------------------------
# checkpoints: Hugging Face format, written under a temporary name and renamed


def save_checkpoint(path, model, tok, args=None, state=None, weights=None):
    """Save model + tokenizer (+ the run's flags as args.json, + the training state of
    `state` as trainer_state.pt, for --resume) to `path` atomically. `weights`: the model's
    whole state dict when the model itself holds only a shard of it (FSDP).

    A LoRA model is saved merged (a plain checkpoint that every script loads), with its
    adapters beside it in `adapter/` (what --resume goes on from).

    A crash while writing leaves only a `.tmp-` folder behind; `path` is either the
    previous complete checkpoint or the new complete one, never a half-written one.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    old = path.with_name(f".old-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if is_lora(model):
        model.get_base_model().save_pretrained(tmp, state_dict=merged_state_dict(model))
        model.save_pretrained(tmp / "adapter", save_embedding_layers=False)  # (no look-up on the hub)
    else:
        model.save_pretrained(tmp, state_dict=weights)
    tok.save_pretrained(tmp)
    if args is not None:
        with open(tmp / "args.json", "w") as f:
            json.dump(args, f, indent=2)
    if state is not None:
        torch.save(state, tmp / STATE_FILE)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)  # left by a crash between the two renames below
        os.replace(path, old)  # a folder cannot be replaced in place: move the old one aside
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def prune_checkpoints(out, keep):
    """Delete all but the newest `keep` step-NNNNNN checkpoints of a run folder (0 keeps all)."""
    steps = sorted(d for d in os.listdir(out) if d.startswith("step-")) if keep else []
    for d in steps[:-keep]:
        shutil.rmtree(os.path.join(out, d))

# ----------------------------------------------------------------------------------------
# exact resume: a checkpoint also holds everything the next step depends on


STATE_FILE = "trainer_state.pt"


def rng_state(generators=()):
    """Every random state a process draws from: Python's, numpy's, torch's (CPU and its own
    GPU) and the run's own torch.Generators (sampling, evaluation)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "generators": [g.get_state() for g in generators]}


def set_rng_state(state, generators=()):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)


def resume_from(out, resume, flags, checked):
    """The checkpoint --resume names -> (its folder, its training state); (None, None) for a
    new run (`resume` None). `resume` is "latest" (the newest checkpoint of `out` that holds
    a training state) or a checkpoint folder.
    Refuses to resume into an `out` that holds later checkpoints (two histories would mix),
    and warns about changed flags that the resumed run will follow. checked: the script's
    flags whose change makes the run differ from an uninterrupted one."""
    if resume is None:
        return None, None
    if resume == "latest":
        found = sorted(d for d in os.listdir(out) if d.startswith("step-")
                       and os.path.exists(os.path.join(out, d, STATE_FILE))) if os.path.isdir(out) else []
        if not found:
            raise UserError(f"--resume: {out} holds no checkpoint with a {STATE_FILE} to resume from; "
                            "--overwrite starts over instead")
        path = os.path.join(out, found[-1])
    else:
        path = resume
        if not os.path.exists(os.path.join(path, STATE_FILE)):
            raise UserError(f"--resume {path}: no {STATE_FILE} there (not a checkpoint of this project's runs)")
    # the state holds Python objects (RNG states), so it is unpickled: load only your own
    # checkpoints. Tensors come to the CPU, mapped from the file; each is copied to its
    # parameter's device from there
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False,
                       mmap=True)  # processes share the file's pages instead of a copy each
    later = sorted(d for d in os.listdir(out) if d.startswith("step-") and d[5:].isdigit()
                   and int(d[5:]) > state["step"]) if os.path.isdir(out) else []
    if later:
        raise UserError(f"--resume {path}: {out} holds later checkpoints ({', '.join(later)}) of the run that "
                        "went on from there; resume into a new --out, or delete them")
    changed = [f"--{k.replace('_', '-')} {state['flags'][k]} -> {v}" for k, v in flags.items()
               if k in checked and k in state["flags"] and state["flags"][k] != v]  # (a flag newer than the run: not)
    if changed:
        warn0(f"warning: resuming with changed flags ({'; '.join(changed)}): the run goes on, but not as "
               "the uninterrupted one would have")
    return path, state


def save_training_checkpoint(out, step, model, opt, tok, flags, state, generators, keep, rank, resumable=True):
    """OUT/step-NNNNNN for --resume: the model, the optimizer's state, `state` (what else the
    script must restore), every process's random streams and the flags, written by process
    0, which then keeps the newest `keep` checkpoints and says where it wrote. Every process
    must call it (an FSDP model's shards are gathered). resumable False: the model and flags
    alone (a third of the size: AdamW keeps two numbers a weight). Returns the path (None in the others)."""
    rngs = all_gather([rng_state(generators)])  # each process's own, in rank order
    weights, optimizer = None, opt.state_dict() if resumable else None
    if is_sharded(model):  # whole tensors, gathered to process 0's CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        weights = full_state_dict(model)
        if getattr(model.config, "tie_word_embeddings", False):  # the head's gathered copy of the input embeddings
            weights.pop(next(f"{n}.weight" for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
        # (before the first step there is no state, and asking for it would take a step of zeros)
        optimizer = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
            if opt.state and resumable else None
    if rank:
        return None
    path = save_checkpoint(os.path.join(out, f"step-{step:06d}"), model, tok, flags,
                           {**state, "optimizer": optimizer, "step": step, "rng": rngs, "flags": flags}
                           if resumable else None, weights)
    prune_checkpoints(out, keep)
    print0(f"saved {path}" + ("" if resumable else " (weights only: --save-optimizer 0)"))
    return path


def restore_training(model, opt, state, path, world, weight_decay, out, logs):
    """Go on from the training state of the checkpoint at `path` -> its step: the optimizer
    restored, and the records that `logs` (files of `out`) got after that step dropped,
    since the resumed run logs them again."""
    restore_optimizer(model, opt, state, path, world, weight_decay)
    for name in logs if int(os.environ.get("RANK", "0")) == 0 else []:
        truncate_jsonl(os.path.join(out, name), state["step"])
    print0(f"resuming from {path} after step {state['step']}")
    return state["step"]


def restore_optimizer(model, opt, state, path, world, weight_decay):
    """The resumed optimizer (after a check that as many processes resume as wrote `state`,
    sharded or not as it was); weight decay follows the flag, and the learning rate is set
    by the loop every step."""
    if len(state["rng"]) != world:
        raise UserError(f"--resume {path}: written by {len(state['rng'])} processes, resumed by {world}; "
                        "each process continues its own random streams, so use as many")
    for flag, now in [("fsdp", is_sharded(model)), ("lora_rank", is_lora(model))]:
        if bool(state["flags"].get(flag)) != now:
            raise UserError(f"--resume {path}: written {'with' if not now else 'without'} --{flag.replace('_', '-')}; "
                            "resume the same way (the optimizer's state differs)")
    if is_sharded(model) and state["optimizer"] is not None:  # each process takes its shard of the whole tensors
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    elif not is_sharded(model):
        opt.load_state_dict(state["optimizer"])
    for group in opt.param_groups:
        group["weight_decay"] = weight_decay


def truncate_jsonl(path, step):
    """Drop the records of steps after `step` (logged after the checkpoint a run resumes from),
    atomically; records without a step (a run's header) stay."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:  # the half-written last line of a killed run
            lines.pop()
    lines = [line for line in lines if json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)
