"""Three optimisation steps of clip_train's real step code, run by tests/test_distributed.py either
as one process on the whole batch or under `torchrun --nproc_per_node=2` (gloo, CPU) on half a
batch per process, with --accum-steps micro-batches. Row 3 of every batch stands for an unreadable
image (masked out of the loss, as train_one_epoch does). Writes {loss: updated weights and losses}
(rank 0) to OUT, for each of the comma-separated LOSSES in turn (one process start for all).

    $ python tests/ddp_step_check.py OUT clip,label-aware 1          # one process, the whole batch
    $ torchrun --standalone --nproc_per_node=2 tests/ddp_step_check.py OUT clip,label-aware 2
"""

import argparse
import sys
from pathlib import Path

import torch

from orbital_clip.train import distributed as train_distributed
from orbital_clip.train import loop as train_loop
from orbital_clip.train import losses as train_losses
from orbital_clip import checkpoint
from orbital_clip import models
from orbital_clip import prompts

BATCH = 8  # global
STEPS = 3


def main(out_path, loss_kinds, accum_steps):
    args = argparse.Namespace(device=torch.device("cpu"), batch_size=BATCH, dist_timeout=5.0,
                              precision="fp32", accum_steps=accum_steps, logit_scale_mode="exp")
    train_distributed.init_distributed(args)
    models.register_model_config(Path(__file__).resolve().parent.parent / "demo" / "tiny_clip.json")
    results = {kind: run_steps(args, kind) for kind in loss_kinds.split(",")}
    if args.rank == 0:
        torch.save(results, out_path)
    if args.world_size > 1:
        torch.distributed.destroy_process_group()


def run_steps(args, loss_kind):
    """STEPS steps from the same seeded model; returns (rank 0's) weights and losses."""
    torch.manual_seed(0)
    model, *_, tokenizer = models.create_model("tiny_clip", None)
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 2, 1, 1, 0, 2, 1])
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    per_rank = BATCH // args.world_size
    mine = slice(args.rank * per_rank, (args.rank + 1) * per_rank)
    train_model = train_distributed.wrap_for_training(model, argparse.Namespace(compile=False, **vars(args)))
    # Plain SGD: the updated weights differ exactly by the gradients (Adam's first step is a
    # sign of the gradient, which amplifies float noise in gradients that are ~0).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ctx = {"args": args, "scaler": torch.amp.GradScaler("cpu", enabled=False), "tokenizer": tokenizer,
           "loss_fn": train_losses.make_loss(loss_kind, args.rank, args.world_size)}
    losses = []
    for step in range(STEPS):
        images = torch.randn(BATCH, 3, 64, 64, generator=generator)
        # A fixed caption per image, so both layouts see the same pairs.
        captions = prompts.sample_train_captions(labels.tolist(), prompts.load_prompt_set(),
                                                 prompts.new_rng(step))
        optimizer.zero_grad()
        loss = train_loop.accumulate_gradients(train_model, images[mine], labels[mine], captions[mine],
                                               ctx, valid=valid[mine])
        optimizer.step()
        losses.append(loss.item())
    return {"state_dict": checkpoint.clean_state_dict(model.state_dict()), "losses": losses,
            "world_size": args.world_size}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
