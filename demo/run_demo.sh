#!/usr/bin/env bash
# The whole pipeline on a synthetic cohort, offline, on the CPU (a few minutes on 2 cores).
# Everything it writes lives in demo_run/, which it recreates on every run.
set -euo pipefail
PY=${1:-python3}
cd "$(dirname "$0")/.."
OUT=demo_run
if [ -e "$OUT" ] && [ ! -e "$OUT/.orbital-clip-demo" ]; then
  echo "error: $OUT exists and was not made by this demo; move it away first" >&2
  exit 2
fi
rm -rf "$OUT"
mkdir -p "$OUT"
touch "$OUT/.orbital-clip-demo"

echo "== 1/4 drawing a synthetic (not clinical) cohort and an external test cohort"
$PY demo/make_demo_cohort.py --out "$OUT/dataset_root" --seed 0 --counts 40 120 80
$PY demo/make_demo_cohort.py --out "$OUT/external_cohort" --seed 1 --counts 20 60 40

echo "== 2/4 stratified train/val split (the source images are copied, never moved)"
$PY data_preprocess.py --data-root "$OUT/dataset_root"

echo "== 3/4 fine-tuning the tiny demo model (random init; real runs use pretrained ViT-B-32-256)"
# --precision fp32: the same numbers on every CPU (auto would pick bf16 on AMX/AVX512-BF16 CPUs)
$PY clip_train.py --train-dir "$OUT/dataset_root/train" --val-dir "$OUT/dataset_root/val" \
  --save-dir "$OUT/clip_model_checkpoints" --model-config demo/tiny_clip.json --pretrained none \
  --batch-size 32 --epochs 20 --lr 1e-3 --weight-decay 0.1 --select-metric balanced_accuracy \
  --precision fp32

echo "== 4/4 external evaluation of the best checkpoint (with heatmaps of its top errors)"
$PY inference.py --test-dir "$OUT/external_cohort" \
  --checkpoint "$OUT/clip_model_checkpoints/clip_model_epoch_best.pt" \
  --output-dir "$OUT/inference_results" --precision fp32 --explain 3

echo "== baseline: a linear probe on the frozen (random-init) tiny tower, its few-shot curve and evaluation"
$PY linear_probe.py --train-dir "$OUT/dataset_root/train" --val-dir "$OUT/dataset_root/val" \
  --model-config demo/tiny_clip.json --pretrained none --out-dir "$OUT/linear_probe" --precision fp32 \
  --few-shot 1 2 4 8 16 all --draws 3 --test-dir "$OUT/external_cohort" --c-grid 10 100 1000 10000 100000
$PY inference.py --test-dir "$OUT/external_cohort" --checkpoint "$OUT/linear_probe/linear_probe.pt" \
  --out-dir "$OUT/linear_probe_results" --precision fp32

echo
echo "Demo finished. Look at:"
echo "  $OUT/dataset_root/manifest.csv                   the split"
echo "  $OUT/clip_model_checkpoints/training_curves.png  training curves"
echo "  $OUT/inference_results/report.md                 the evaluation report"
echo "  $OUT/inference_results/metrics.json, per_class_metrics.csv   metrics with 95% CIs"
echo "  $OUT/inference_results/confusion_matrix.png, roc_curves.png, pr_curves.png, calibration.png"
echo "  $OUT/linear_probe/fewshot.png, $OUT/linear_probe_results/report.md   the linear-probe baseline"
