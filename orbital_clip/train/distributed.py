"""torchrun: the process group, sums over processes, and the DDP (and compile) wrapper."""

import datetime
import os

import torch


def init_distributed(args):
    """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE; start NCCL (GPU) or gloo (CPU) when > 1 process."""
    args.rank = int(os.environ.get("RANK", "0"))
    args.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.world_size <= 1:
        return
    if args.batch_size % args.world_size:
        raise ValueError(f"--batch-size {args.batch_size} is the global batch and must be divisible "
                         f"by the {args.world_size} processes")
    if args.device.type == "cuda":
        args.device = torch.device("cuda", args.local_rank)
        torch.cuda.set_device(args.device)
    backend = "nccl" if args.device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=args.dist_timeout))


def global_sums(values, args):
    """Sums of ints over the torchrun processes (the values themselves in one process)."""
    if args.world_size <= 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.int64, device=args.device)  # NCCL needs a GPU tensor
    torch.distributed.all_reduce(total)
    return total.tolist()


def wrap_for_training(model, args):
    """torch.compile the towers (opt-in) and wrap in DistributedDataParallel under torchrun."""
    if args.compile:
        # In place (nn.Module.compile): the parameters keep their names (no `_orig_mod.`), so
        # the WiSE-FT weights and checkpoints load into the same modules. CustomTextCLIP models
        # (SigLIP, Hugging Face text towers) hold their text tower in `.text`, CLIP in `.transformer`.
        model.visual.compile()
        (model.text if hasattr(model, "text") else model.transformer).compile()
    if args.world_size <= 1:
        return model
    device_ids = [args.device.index] if args.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
