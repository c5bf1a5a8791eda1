"""Performance harness: is the model kept busy, or does decoding camera photographs starve it?

Generates camera-size JPEGs, then measures in one process (medians of timed repeats after a
warm-up): training and inference throughput on preloaded tensors (the model alone) against the
real loop reading files (full decode, JPEG draft decode, pre-resized copies); the text tower with
and without unique-caption encoding; decode rates; compute efficiency against a measured matmul
peak; peak memory; bf16 against fp32 (model-only training step and image encoding, interleaved,
best of the repeats) and how often bf16 and fp32 predict the same class on demo-cohort images.
Ratios are what to read: they compare paths measured on the same machine.

    $ python benchmarks/run.py --quick                      # <= 3 minutes on 2 CPU cores
    $ python benchmarks/run.py --quick --json bench.json
    $ python benchmarks/run.py --model-name ViT-B-32-256 --batch-size 32 --repeats 10
    $ python benchmarks/run.py --bf16-only --batch-size 8 --infer-batch-size 32   # bf16 vs fp32 only
"""

import argparse
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from orbital_clip.train import loop as train_loop
from orbital_clip.train import losses as train_losses
from orbital_clip.train import schedule as train_schedule
from orbital_clip import cli
from orbital_clip import cohort
from orbital_clip import images as image_io
from orbital_clip import models
from orbital_clip import outputs
from orbital_clip import zero_shot
from orbital_clip.split import materialise
from orbital_clip import prompts as prompt_sets

from demo import make_demo_cohort

CAMERA_SIZE_PX = (3000, 2000)  # a 6 MP phone/camera photograph
JPEG_QUALITY = 90


def make_camera_jpegs(folder, count, seed=0, size_px=CAMERA_SIZE_PX):
    """Write `count` smooth-noise camera-size JPEGs (photographs compress like this, not like
    white noise); returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, size=(size_px[1] // 50, size_px[0] // 50, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size_px, Image.Resampling.BICUBIC)
        path = folder / f"photo_{i:03d}.jpg"
        image.save(path, quality=JPEG_QUALITY)
        paths.append(path)
    return paths


def make_resized_copies(paths, folder, short_side_px):
    """Pre-resized copies (shorter side = short_side_px), written by the very function behind
    `data_preprocess.py --resize-px`."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        materialise.write_resized(path, folder / path.name, short_side_px)
    return [folder / path.name for path in paths]


def median_time(fn, repeats, warmup=1):
    """Median wall seconds of fn() over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_rates(paths, short_side_px, resized_paths, repeats):
    """Images/s for full decode, draft decode and pre-resized reads (one core)."""
    rates = {}
    for name, files, min_side in (("full", paths, None), ("draft", paths, short_side_px),
                                  ("pre_resized", resized_paths, short_side_px)):
        seconds = median_time(lambda: [image_io.read_image(p, min_side) for p in files[:4]], repeats)
        rates[f"decode_{name}_images_per_s"] = 4 / seconds
    return rates


def matmul_peak_flops(device, precision="fp32", repeats=5, size=2048):
    """Measured matmul FLOP/s in the run's precision: the practical ceiling on this device."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    size = size * 4 if device.type == "cuda" else size  # big enough to fill a GPU
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def run():
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()

    return 2 * size ** 3 / median_time(run, repeats)


def training_context(model, tokenizer, classes, device, precision, batch_size):
    """The pieces clip_train's step needs, with the published optimiser and loss."""
    args = argparse.Namespace(device=device, precision=precision, accum_steps=1,
                              logit_scale_mode="exp", lr=1e-8, schedule="const", epochs=1,
                              batch_size=batch_size, balanced_sampling=False)
    return {"args": args, "classes": classes, "tokenizer": tokenizer,
            "caption_rng": prompt_sets.new_rng(0), "progress": False,
            "optimizer": torch.optim.AdamW(train_schedule.param_groups(model, 1e-8), lr=1e-8),
            "scaler": torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
            "loss_fn": train_losses.make_loss("clip"), "warmup_steps": 0, "total_steps": 10 ** 9}


def train_step(model, ctx, images, labels):
    captions = prompt_sets.sample_train_captions(labels.tolist(), ctx["classes"], ctx["caption_rng"])
    ctx["optimizer"].zero_grad(set_to_none=True)
    train_loop.accumulate_gradients(model, images, labels, captions, ctx)
    ctx["optimizer"].step()
    if ctx["args"].device.type == "cuda":
        torch.cuda.synchronize()


def loader_step_times(loader, step_fn, n_steps):
    """Seconds between consecutive finished steps of a real loader loop (data wait included)."""
    times, iterator = [], iter(loader)
    start = time.perf_counter()
    for _ in range(n_steps):
        images, labels, _idx, _ok = next(iterator)
        step_fn(images, labels)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times


def looped_items(paths, n_items):
    """(path, label) items cycling through the files, labels spread over three classes."""
    return [(paths[i % len(paths)], i % 3) for i in range(n_items)]


def file_loader(files, transform, batch, size, opts):
    """The real loader over `files` = (paths, min_side_px), enough items for the timed steps."""
    paths, min_side = files
    items = looped_items(paths, batch * (opts.repeats + 1))
    dataset = cohort.ImageListDataset(items, transform, min_side_px=min_side, image_shape=(3, size, size))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=opts.workers,
                                       pin_memory=opts.device.type == "cuda",
                                       prefetch_factor=4 if opts.workers else None)


def bracketed_ratios(model_block, e2e_block, modes):
    """Model-only blocks before and after each end-to-end block: each mode's ratio is against the
    mean of its two neighbours, so slow drift of a shared CPU (frequency, other tenants) cancels
    instead of landing on whichever path happened to be measured in the slow minute."""
    model_times = [model_block()]
    e2e_times = {}
    for mode in modes:
        e2e_times[mode] = e2e_block(mode)
        model_times.append(model_block())
    neighbours = {mode: (model_times[i] + model_times[i + 1]) / 2 for i, mode in enumerate(modes)}
    return min(model_times), neighbours, e2e_times


def benchmark_training(model, tokenizer, transforms, files_by_mode, opts):
    """Model-only vs end-to-end training samples/s, per decode mode."""
    device, batch = opts.device, opts.batch_size
    classes = prompt_sets.load_prompt_set()
    ctx = training_context(model, tokenizer, classes, device, opts.precision, batch)
    size = models.model_image_size(model)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.tensor([i % 3 for i in range(batch)])
    model.train()

    def e2e_block(mode):
        loader = file_loader(files_by_mode[mode], transforms[0], batch, size, opts)
        times = loader_step_times(loader, lambda x, y: train_step(model, ctx, x.to(device), y), opts.repeats + 1)
        return statistics.median(times[1:])  # the first step also starts the workers

    best_s, neighbours, e2e = bracketed_ratios(
        lambda: median_time(lambda: train_step(model, ctx, images, labels), opts.repeats),
        e2e_block, list(files_by_mode))
    results = {"train_model_samples_per_s": batch / best_s}
    for mode in files_by_mode:
        results[f"train_e2e_{mode}_samples_per_s"] = batch / e2e[mode]
        results[f"train_e2e_over_model_{mode}"] = neighbours[mode] / e2e[mode]
    return results


def benchmark_inference(model, transforms, files_by_mode, opts):
    """Model-only vs end-to-end inference images/s, per decode mode."""
    device, batch = opts.device, opts.infer_batch_size
    size = models.model_image_size(model)
    images = torch.randn(batch, 3, size, size, device=device)
    model.eval()

    encoder = zero_shot.image_encoder(model, device, opts.precision)  # the path inference.py runs

    def encode(x):
        with torch.inference_mode():
            encoder(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def e2e_block(mode):
        loader = file_loader(files_by_mode[mode], transforms[1], batch, size, opts)
        times = loader_step_times(loader, lambda x, y: encode(x.to(device)), opts.repeats + 1)
        return statistics.median(times[1:])

    best_s, neighbours, e2e = bracketed_ratios(lambda: median_time(lambda: encode(images), opts.repeats),
                                               e2e_block, list(files_by_mode))
    results = {"infer_model_images_per_s": batch / best_s}
    for mode in files_by_mode:
        results[f"infer_e2e_{mode}_images_per_s"] = batch / e2e[mode]
        results[f"infer_e2e_over_model_{mode}"] = neighbours[mode] / e2e[mode]
    return results


def interleaved_best(fns, repeats):
    """{name: best wall seconds} of each fn, the fns called in turn `repeats` times after one
    warm-up round: a shared CPU's slow minutes fall on every path alike, and the best of the
    repeats is the least disturbed one."""
    times = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:  # round 0 warms up (allocator, oneDNN kernels, autocast caches)
                times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def benchmark_bf16_speedups(model, tokenizer, opts):
    """Model-only training step and image-encoding batch, fp32 against bf16 (training: autocast
    with fp32 master weights; inference: zero_shot.image_encoder, the path inference.py runs)."""
    device = opts.device
    classes = prompt_sets.load_prompt_set()
    size = models.model_image_size(model)
    images = torch.randn(opts.batch_size, 3, size, size, device=device)
    labels = torch.tensor([i % 3 for i in range(opts.batch_size)])
    contexts = {p: training_context(model, tokenizer, classes, device, p, opts.batch_size) for p in ("fp32", "bf16")}
    model.train()
    train = interleaved_best({p: lambda p=p: train_step(model, contexts[p], images, labels) for p in contexts},
                             opts.repeats)
    model.eval()
    batch = torch.randn(opts.infer_batch_size, 3, size, size, device=device)
    encoders = {p: zero_shot.image_encoder(model, device, p) for p in ("fp32", "bf16")}

    def encode(precision):
        with torch.inference_mode():
            encoders[precision](batch)
        if device.type == "cuda":
            torch.cuda.synchronize()

    infer = interleaved_best({p: lambda p=p: encode(p) for p in encoders}, opts.repeats)
    return {"train_fp32_step_s": train["fp32"], "train_bf16_step_s": train["bf16"],
            "train_bf16_speedup": train["fp32"] / train["bf16"],
            "infer_fp32_batch_s": infer["fp32"], "infer_bf16_batch_s": infer["bf16"],
            "infer_bf16_speedup": infer["fp32"] / infer["bf16"]}


def bf16_agreement(model, tokenizer, transform, folder, opts):
    """Share of demo-cohort images for which bf16 and fp32 encoding predict the same class with
    the model's zero-shot classifier (fp32, evaluation prompts), and the lowest cosine between
    the two feature vectors of an image."""
    root = Path(folder) / "demo"
    make_demo_cohort.write_cohort(root, opts.agreement_counts, 0)
    classes = prompt_sets.load_prompt_set()
    items = cohort.load_labelled_items(str(root), prompt_sets.class_folders(classes), None)
    size = models.model_image_size(model)
    dataset = cohort.ImageListDataset(items, transform, min_side_px=size, image_shape=(3, size, size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=opts.infer_batch_size, num_workers=0)
    model.eval()
    with torch.inference_mode():
        classifier = zero_shot.build_zero_shot_classifier(model, tokenizer, [c.eval for c in classes], opts.device)
        features = {p: zero_shot.encode_image_batches(model, loader, opts.device, p)[0] for p in ("fp32", "bf16")}
    preds = {p: (f @ classifier.float().cpu()).argmax(dim=1) for p, f in features.items()}
    cosine = torch.nn.functional.cosine_similarity(features["fp32"], features["bf16"], dim=1)
    return {"bf16_prediction_agreement": float((preds["fp32"] == preds["bf16"]).float().mean()),
            "bf16_agreement_images": len(items), "bf16_feature_cosine_min": float(cosine.min())}


def benchmark_text_dedup(model, tokenizer, opts):
    """Text-tower step (forward + backward through the loss) on the published batch of captions:
    every caption encoded vs. each distinct caption once."""
    device = opts.device
    classes = prompt_sets.load_prompt_set()
    labels = [i % 3 for i in range(opts.caption_batch)]
    captions = prompt_sets.sample_train_captions(labels, classes, random.Random(0))
    image_features = torch.nn.functional.normalize(torch.randn(len(captions), model.text_projection.shape[1],
                                                               device=device), dim=-1)
    loss_fn = train_losses.make_loss("clip")
    model.train()

    def step(dedup):
        model.zero_grad(set_to_none=True)
        with models.autocast_context(device, opts.precision):
            text = train_loop.encode_captions(model, tokenizer, captions, device, dedup=dedup).float()
            loss = loss_fn(image_features, text, model.logit_scale.exp(), None)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    naive_s = median_time(lambda: step(False), opts.repeats)
    dedup_s = median_time(lambda: step(True), opts.repeats)
    return {"text_naive_step_s": naive_s, "text_dedup_step_s": dedup_s,
            "text_dedup_speedup": naive_s / dedup_s,
            "text_unique_captions": len(set(captions)), "text_captions": len(captions)}


def training_flops_per_sample(model, tokenizer, opts):
    """FLOPs of one training sample (forward + backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    size = models.model_image_size(model)
    images = torch.randn(2, 3, size, size, device=opts.device)
    tokens = tokenizer(["orbital eye disease", "no eye disease"]).to(opts.device)
    with FlopCounterMode(display=False) as counter:
        image = model.encode_image(images, normalize=True)
        text = model.encode_text(tokens, normalize=True)
        (image @ text.T).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def markdown_table(results):
    lines = ["| measure | value |", "| --- | --- |"]
    for key, value in results.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: <= 3 minutes on 2 CPU cores with the real ViT-B-32-256")
    parser.add_argument("--model-name", default="ViT-B-32-256", help="open_clip architecture (random weights)")
    parser.add_argument("--model-config", default=None, help="custom architecture JSON (e.g. demo/tiny_clip.json)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (quick: 4; else 16)")
    parser.add_argument("--infer-batch-size", type=int, default=None, help="inference batch (quick: 8; else 64)")
    parser.add_argument("--caption-batch", type=int, default=None,
                        help="captions in the text-tower step (default: the published batch, 200; quick: 48)")
    parser.add_argument("--images", type=int, default=None, help="distinct camera JPEGs to generate (quick: 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measure (>= 5; quick: 5)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: as training)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="precision of the end-to-end and text measures (auto: as the scripts, bf16 where "
                             "the hardware multiplies bf16 natively); bf16 vs fp32 is measured either way")
    parser.add_argument("--agreement-images", type=int, default=None,
                        help="demo-cohort images for bf16_prediction_agreement (quick: 48; else 240)")
    parser.add_argument("--bf16-only", action="store_true",
                        help="only the bf16-vs-fp32 measures (speedups and prediction agreement)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    quick = {"batch_size": 4, "infer_batch_size": 8, "images": 8, "repeats": 5, "caption_batch": 48,
             "agreement_images": 48}
    full = {"batch_size": 16, "infer_batch_size": 64, "images": 32, "repeats": 10, "caption_batch": 200,
            "agreement_images": 240}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5 (medians of at least five timed repeats)")
    if min(args.batch_size, args.infer_batch_size, args.images) < 2:
        parser.error("--batch-size, --infer-batch-size and --images must be >= 2")
    if args.agreement_images < 3:
        parser.error("--agreement-images must be >= 3 (one per class at least)")
    # the demo cohort's proportions (40 / 120 / 80), at least one image per class
    share = (1, 3, 2)
    args.agreement_counts = tuple(max(1, round(args.agreement_images * k / 6)) for k in share)
    args.workers = cli.default_workers(args.device) if args.workers is None else args.workers
    return args


def main(argv=None):
    opts = parse_args(argv)
    opts.device = models.resolve_device(opts.device)
    opts.precision, why = models.resolve_precision(opts.precision, opts.device)
    print(f"precision {opts.precision} ({why})", file=sys.stderr)
    torch.manual_seed(0)
    model_name = opts.model_name
    if opts.model_config:
        model_name, _ = models.register_model_config(opts.model_config)
    model, train_tf, val_tf, tokenizer = models.create_model(model_name, None, opts.device)
    size = models.model_image_size(model)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = {"model": model_name, "device": str(opts.device), "precision": opts.precision,
                   "precision_why": why, "batch_size": opts.batch_size, "infer_batch_size": opts.infer_batch_size,
                   "workers": opts.workers, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "cpu_native_bf16": models.cpu_native_bf16()}
        results.update(benchmark_bf16_speedups(model, tokenizer, opts))
        results.update(bf16_agreement(model, tokenizer, val_tf, tmp, opts))
        if opts.bf16_only:
            print(markdown_table(results))
            if opts.json:
                outputs.atomic_write_json(opts.json, results)
            return 0
        print(f"generating {opts.images} camera JPEGs {CAMERA_SIZE_PX[0]}x{CAMERA_SIZE_PX[1]} ...", file=sys.stderr)
        paths = make_camera_jpegs(Path(tmp) / "camera", opts.images)
        # The README's setting for camera photographs: data_preprocess.py --resize-px at twice the
        # model input (crops and augmentation keep full resolution; draft decoding does the rest).
        resized = make_resized_copies(paths, Path(tmp) / "resized", 2 * size)
        files_by_mode = {"full": (paths, None), "draft": (paths, size), "pre_resized": (resized, size)}
        results.update(decode_rates(paths, size, resized, opts.repeats))
        results.update(benchmark_text_dedup(model, tokenizer, opts))
        results.update(benchmark_training(model, tokenizer, (train_tf, val_tf), files_by_mode, opts))
        results.update(benchmark_inference(model, (train_tf, val_tf), files_by_mode, opts))
    flops = training_flops_per_sample(model, tokenizer, opts)
    peak = matmul_peak_flops(opts.device, opts.precision)
    results.update({
        "train_flops_per_sample": flops, "matmul_peak_flops": peak,
        "train_compute_efficiency": flops * results["train_model_samples_per_s"] / peak,
        "peak_memory_bytes": peak_memory_bytes(opts.device),
        # The headline ratios: the loop the README recommends for camera photographs
        # (pre-resized copies) against the model alone.
        "train_e2e_over_model": results["train_e2e_over_model_pre_resized"],
        "infer_e2e_over_model": results["infer_e2e_over_model_pre_resized"],
        "seconds": time.perf_counter() - started,
        "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(opts.device) if opts.device.type == "cuda" else None,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    })
    print(markdown_table(results))
    if opts.json:
        outputs.atomic_write_json(opts.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
