"""One optimisation step of clip_train's real step code, run by tests/test_distributed.py either
as one process on the whole batch or under `torchrun --nproc_per_node=2` (gloo, CPU) on half a
batch per process. Writes the updated weights (rank 0) to OUT for comparison.

    $ python tests/ddp_step_check.py OUT LOSS            # one process, 2b images
    $ torchrun --standalone --nproc_per_node=2 tests/ddp_step_check.py OUT LOSS
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import clip_train  # noqa: E402
import common  # noqa: E402
import prompts  # noqa: E402

BATCH = 8  # global


def main(out_path, loss_kind):
    args = argparse.Namespace(device=torch.device("cpu"), batch_size=BATCH, dist_timeout=5.0,
                              precision="fp32", accum_steps=1, logit_scale_mode="exp")
    clip_train.init_distributed(args)
    common.register_model_config(Path(__file__).resolve().parent.parent / "demo" / "tiny_clip.json")
    torch.manual_seed(0)
    model, *_, tokenizer = common.create_model("tiny_clip", None)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 64, 64, generator=generator)
    labels = torch.tensor([0, 1, 2, 1, 1, 0, 2, 1])
    # A fixed caption per image, so both layouts see the same pairs.
    captions = prompts.sample_train_captions(labels.tolist(), prompts.load_prompt_set(), prompts.new_rng(0))
    per_rank = BATCH // args.world_size
    mine = slice(args.rank * per_rank, (args.rank + 1) * per_rank)
    train_model = clip_train.wrap_for_training(model, argparse.Namespace(compile=False, **vars(args)))
    # Plain SGD: the updated weights differ exactly by the gradients (Adam's first step is a
    # sign of the gradient, which amplifies float noise in gradients that are ~0).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ctx = {"args": args, "scaler": torch.amp.GradScaler("cpu", enabled=False), "tokenizer": tokenizer,
           "loss_fn": clip_train.make_loss(loss_kind, args.rank, args.world_size)}
    optimizer.zero_grad()
    loss = clip_train.accumulate_gradients(train_model, images[mine], labels[mine], captions[mine], ctx)
    optimizer.step()
    if args.rank == 0:
        torch.save({"state_dict": common.clean_state_dict(model.state_dict()), "loss": loss.item(),
                    "world_size": args.world_size}, out_path)
    if args.world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
