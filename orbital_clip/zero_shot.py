"""Zero-shot classification: the class-embedding matrix of prompt lists, and image features."""

import copy

import torch

from orbital_clip import models

@torch.no_grad()
def build_zero_shot_classifier(model, tokenizer, prompt_lists, device):
    """(D, C) matrix of class embeddings: the mean of each class's normalised prompt embeddings.

    Written here rather than with open_clip's helper because classes carry prompt lists of
    different lengths, not one shared template list.
    """
    all_prompts = [p for prompts in prompt_lists for p in prompts]
    tokens = tokenizer(all_prompts).to(device)
    features = model.encode_text(tokens).float()
    features = features / features.norm(dim=-1, keepdim=True)  # (P, D)
    columns, start = [], 0
    for prompts in prompt_lists:
        mean = features[start:start + len(prompts)].mean(dim=0)
        columns.append(mean / mean.norm())
        start += len(prompts)
    return torch.stack(columns, dim=1)  # (D, C)


def zero_shot_logits(image_features, classifier, logit_scale):
    """Scaled cosine logits (N, C) from raw image features (N, D) and a (D, C) classifier."""
    image_features = image_features.float()
    image_features = image_features / image_features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return logit_scale * image_features @ classifier


def image_encoder(model, device, precision):
    """A function images (B, 3, H, W) -> raw image features (B, D) float32, for inference only.

    bf16 on the CPU runs a bf16 copy of the image tower: measured on ViT-B-32-256 (2-core CPU,
    benchmarks/RESULTS.md) 3-5x faster than fp32, while autocast under inference_mode measured
    slower than fp32. A copy, so the model itself (being trained, or reloaded for WiSE-FT) keeps
    its fp32 weights; CUDA keeps autocast.
    """
    if device.type == "cpu" and precision == "bf16":
        visual = getattr(model.visual, "_orig_mod", model.visual)  # unwrap a torch.compile wrapper
        # Cast while copying (a deepcopy memo of bf16 tensors), so no transient fp32 copy exists.
        memo = {id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
                for p in visual.parameters() if p.is_floating_point()}
        memo.update({id(b): b.detach().to(torch.bfloat16)
                     for b in visual.buffers() if b.is_floating_point()})
        visual_bf16 = copy.deepcopy(visual, memo).eval()
        # model.encode_image(x) is model.visual(x) (open_clip's CLIP and CustomTextCLIP)
        return lambda images: visual_bf16(images.to(device, torch.bfloat16)).float()

    def encode(images):
        with models.autocast_context(device, precision):
            return model.encode_image(images.to(device, non_blocking=True)).float()
    return encode


@torch.no_grad()
def encode_image_batches(model, loader, device, precision="fp32", progress=None):
    """Normalised image features for every row of an ImageListDataset loader.

    Returns:
        features: (N, D) float32 CPU tensor, zero rows where the image failed to read;
        ok: (N,) bool tensor, False where the image failed to read.
    Rows come back in dataset order whatever the loader's batching.
    """
    n_rows = len(loader.dataset)
    features, ok = None, torch.zeros(n_rows, dtype=torch.bool)
    encode = image_encoder(model, device, precision)
    for images, _labels, indices, good in (progress(loader) if progress else loader):
        good = good.bool()
        batch = encode(images)
        batch = batch / batch.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if features is None:
            features = torch.zeros(n_rows, batch.shape[1])
        features[indices] = torch.where(good[:, None], batch.cpu(), torch.zeros_like(batch.cpu()))
        ok[indices] = good
    return features, ok
