"""Several processes (torchrun) and FSDP2: one process is a world of 1, through the same code.

A run on N processes splits each step's prompts over them; these few collectives make every
process take the same step: the step's counts and metrics summed (all_sum, all_gather), the
gradients summed before the clip (sum_gradients, clip_gradients). With --fsdp, shard() splits
the weights, gradients and AdamW state over the processes, and full_state_dict() gathers
them back for a checkpoint.
"""

import os

import torch

from nanor1.common import UserError, pick_device

# ----------------------------------------------------------------------------------------
# torchrun: the process group, and the few collectives that keep the processes in step


def init_distributed(device_name, backend=None, timeout_hours=2.0):
    """Join torchrun's process group when there is one -> (rank, world, device).

    One process is world 1 through the same code, with no process group. Under torchrun,
    process r takes GPU LOCAL_RANK when the device is CUDA. backend: None = nccl for CUDA
    tensors, gloo on CPU (gloo alone is enough for Python objects).
    """
    import datetime

    import torch.distributed as dist

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = pick_device(device_name)
    if world > 1 and device.type == "cuda" and device_name not in ("auto", "cuda"):
        raise UserError(f"--device {device_name}: under torchrun each process takes GPU LOCAL_RANK; "
                        "use --device cuda (or auto)")
    if world > 1 and device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started process {local_rank} on a machine with "
                            f"{torch.cuda.device_count()} GPUs: use --nproc_per_node {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"),
                                timeout=datetime.timedelta(hours=timeout_hours))
    return rank, world, device


def end_distributed():
    """Leave the process group, once every process is done (a process that left while
    another still wrote its checkpoint would abort it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_sum(values, device):
    """Element-wise sums of a list of numbers over every process (the numbers themselves in
    one process)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(items):
    """Every process's list, concatenated in rank order (the list itself in one process)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def sum_gradients(model):
    """Sum each parameter's gradient over the processes; a process without samples adds zeros.
    (An FSDP model's backward pass has already summed them, each process keeping its shard.)"""
    import torch.distributed as dist

    if not dist.is_initialized() or is_sharded(model):
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def clip_gradients(model, max_norm):
    """Clip the trainable parameters' gradients to a total norm of `max_norm` (0: no clipping)
    -> the norm before clipping, a float (under FSDP, over every process's shards)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                          max_norm or float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

# ----------------------------------------------------------------------------------------
# FSDP2: a model whose training state does not fit in one process, sharded over all of them


def shard(model, device, keep_gathered=True):
    """FSDP2: split the parameters (and their gradients and AdamW state) of every decoder
    layer, and of the rest, evenly over the processes. A layer's whole weights are gathered
    for its forward and backward and freed after. Gradients are summed, not averaged: the
    losses are already weighted by the whole step's counts. keep_gathered: the weights
    outside the layers (embeddings, head) stay whole from a forward to the next backward,
    so sampling does not gather them again for every token. Returns the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    layers = [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]
    if not layers:  # the whole model would be gathered at once: no memory saved
        raise UserError(f"--fsdp: {type(model).__name__} names no layer class to shard by (_no_split_modules)")
    for m in layers + [model]:  # the model last: it holds what no layer does (embeddings, head)
        fully_shard(m, mesh=mesh, reshard_after_forward=m is not model or not keep_gathered)
        if not hasattr(m, "set_force_sum_reduction_for_comms"):
            raise UserError(f"--fsdp: torch {torch.__version__} lacks FSDP2's plain-sum gradient reduction; "
                            "upgrade torch")
        m.set_gradient_divide_factor(1.0)  # a sum (gloo has no average, nor NCCL's pre-scaled sum)
        m.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model):
    try:
        from torch.distributed.fsdp import FSDPModule  # torch 2.6 and later
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def full_state_dict(model):
    """The whole state dict of a sharded model on process 0, on the CPU (every process must
    call it; the others get {}); a plain model's own state dict."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
