"""Contrastive losses of fine-tuning: open_clip's CLIP loss or the label-aware one, over the
valid rows of the global batch, and the logit scale they are fed."""

import math

import open_clip
import torch
import torch.nn.functional as F

from orbital_clip import models


LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps the learned temperature at 100


def unwrap(model):
    """The open_clip model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def loss_scale(model, mode):
    """Scale fed to the loss and the validation softmax: models.logit_scale, the rule inference
    also applies (`--logit-scale-mode`)."""
    return models.logit_scale(unwrap(model), mode)


class LabelAwareClipLoss(open_clip.ClipLoss):
    """Symmetric contrastive loss in which every same-class image-caption pair of the batch is a
    positive with equal target weight (UniCL/FLAIR-style targets). With all-distinct labels the
    targets are the identity and it equals open_clip's ClipLoss. Single-process: under torchrun
    MaskedContrastiveLoss gathers the global batch first."""

    def forward(self, image_features, text_features, logit_scale, labels):
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale)
        targets = (labels[:, None] == labels[None, :]).float()  # (B, B)
        targets = targets / targets.sum(dim=1, keepdim=True)
        loss_image = -(targets * F.log_softmax(logits_per_image, dim=1)).sum(dim=1).mean()
        loss_text = -(targets * F.log_softmax(logits_per_text, dim=1)).sum(dim=1).mean()
        return (loss_image + loss_text) / 2


def gather_labels(labels, world_size):
    """A non-differentiable per-rank tensor of the global batch (rank order) under DDP."""
    if world_size <= 1:
        return labels
    gathered = [torch.zeros_like(labels) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, labels)
    return torch.cat(gathered)


class MaskedContrastiveLoss:
    """loss(image, text, scale, labels, valid=None): the contrastive loss of the global batch's
    valid rows. Every rank gathers the fixed-size features of all ranks (with gradient, as
    open_clip's gather_with_grad) and the validity masks, drops the rows whose image could not
    be read, and computes the same global loss; DDP's gradient average then gives exactly the
    gradient of that loss. Rows are dropped after the gather, so every rank all-gathers tensors
    of the same size whatever fails to load."""

    def __init__(self, kind, rank=0, world_size=1):
        self.kind, self.rank, self.world_size = kind, rank, world_size
        self.loss = LabelAwareClipLoss() if kind == "label-aware" else open_clip.ClipLoss()

    def __call__(self, image, text, scale, labels=None, valid=None):
        if labels is None:  # the plain CLIP loss needs none (label-aware does)
            labels = torch.zeros(len(image), dtype=torch.long, device=image.device)
        valid = torch.ones_like(labels, dtype=torch.bool) if valid is None else valid.to(labels.device)
        if self.world_size > 1:
            image, text = open_clip.loss.gather_features(image, text, gather_with_grad=True,
                                                         rank=self.rank, world_size=self.world_size)
            labels = gather_labels(labels, self.world_size)
            valid = gather_labels(valid, self.world_size)
        image, text, labels = image[valid], text[valid], labels[valid]
        if self.kind == "label-aware":
            return self.loss(image, text, scale, labels)
        return self.loss(image, text, scale)


def make_loss(kind, rank=0, world_size=1):
    """loss_fn(image_features, text_features, scale, labels, valid=None) for `--loss clip|label-aware`."""
    return MaskedContrastiveLoss(kind, rank, world_size)
