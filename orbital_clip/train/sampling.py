"""Which training images each step sees: plain shuffling, class-balanced draws, their
torchrun versions, and worker seeding that a resumed epoch replays."""

import math
import random

import numpy as np
import torch

from orbital_clip import cli
from orbital_clip import cohort


def class_balanced_weights(labels, n_classes):
    """Per-sample weights 1 / (count of its class): every class is drawn equally often."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes).astype(np.float64)
    return torch.as_tensor(1.0 / counts[np.asarray(labels)], dtype=torch.double)


class DistributedBalancedSampler(torch.utils.data.Sampler):
    """Class-balanced draws (with replacement) for one rank of a torchrun job: every rank draws
    the same global sequence from (seed, epoch) and takes every world_size-th index."""

    def __init__(self, weights, num_samples, rank, world_size, seed):
        self.weights, self.rank, self.world_size, self.seed = weights, rank, world_size, seed
        self.per_rank = math.ceil(num_samples / world_size)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.per_rank * self.world_size, replacement=True,
                                  generator=generator)
        return iter(draws[self.rank::self.world_size].tolist())

    def __len__(self):
        return self.per_rank


def train_sampler(items, args, generator, n_classes):
    """None (plain shuffling by the loader), or the class-balanced / distributed sampler."""
    labels = [label for _path, label in items]
    if args.world_size > 1:
        if args.balanced_sampling:
            return DistributedBalancedSampler(class_balanced_weights(labels, n_classes), len(items),
                                              args.rank, args.world_size, args.seed)
        return torch.utils.data.distributed.DistributedSampler(
            items, num_replicas=args.world_size, rank=args.rank, shuffle=True, seed=args.seed)
    if args.balanced_sampling:
        return torch.utils.data.WeightedRandomSampler(class_balanced_weights(labels, n_classes),
                                                      len(items), replacement=True, generator=generator)
    return None


class EpochWorkerSeed:
    """DataLoader worker_init_fn: seeds torch, numpy and random in each worker from (seed, rank,
    epoch, worker id), so a resumed epoch draws the same augmentations as a straight run (the
    workers restart every epoch; train_one_epoch sets `epoch` before they start)."""

    def __init__(self, seed, rank=0):
        self.seed, self.rank, self.epoch = seed, rank, 0

    def __call__(self, worker_id):
        seed = int(np.random.SeedSequence([self.seed, self.rank, self.epoch, worker_id]).generate_state(1)[0])
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)


def make_loader(items, transform, image_size_px, args, shuffle, generator=None, n_classes=None):
    """DataLoader over an ImageListDataset; when shuffling, the sampler draws from `generator`
    (its own: saved and restored on resume) and workers are seeded by EpochWorkerSeed. Class-
    balanced draws with --balanced-sampling (with replacement, one epoch = len(items) draws)."""
    dataset = cohort.ImageListDataset(items, transform, min_side_px=image_size_px,
                                      image_shape=(3, image_size_px, image_size_px))
    if not shuffle:
        # A generator of its own: without one, every pass (validation after each epoch) draws its
        # workers' base seed from the global generator, after the epoch's RNG snapshot, and a
        # resumed epoch would start from another random state than a straight one.
        return torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
            pin_memory=args.device.type == "cuda", worker_init_fn=cli.seed_worker,
            generator=torch.Generator().manual_seed(args.seed), persistent_workers=args.workers > 0)
    sampler = train_sampler(items, args, generator, n_classes)
    if sampler is None:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    # The loader's own generator only picks the workers' base seed, which EpochWorkerSeed
    # replaces: a throwaway one, so it never draws from the sampler's generator (it would
    # after a resume, when the workers start afresh, and change the permutation).
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size // args.world_size, sampler=sampler,
        num_workers=args.workers, pin_memory=args.device.type == "cuda", drop_last=False,
        generator=torch.Generator().manual_seed(args.seed),
        worker_init_fn=EpochWorkerSeed(args.seed, args.rank), persistent_workers=False)
