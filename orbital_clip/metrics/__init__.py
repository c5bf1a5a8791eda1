"""Every evaluation statistic of Orbital-CLIP, in numpy and scipy only (never torch), one concern
per module: `classification` (point metrics of a confusion matrix, Wilson intervals, likelihood
ratios), `calibration` (Brier, log-loss, ECE, reliability bins, temperature), `bootstrap` (the
vectorised image- or group-level percentile bootstrap and `compute_metrics`), `operating` (the
operating rule and training's selection metrics), `compare` (paired comparisons: McNemar, DeLong,
Obuchowski), `sequential` (readings at several steps) and `subgroups`.

The pipelines turn these into metrics.json and report.md; a reviewer checking how an interval is
computed needs to read this package only. Every public name is re-exported here, so
`from orbital_clip.metrics import compute_metrics` does not depend on the module layout.
"""

from orbital_clip.metrics.classification import (DEFAULT_BOOTSTRAP, DEFAULT_SEED, CONFIDENCE_LEVEL,
                                                 OVERALL_METRICS, PROPORTIONS, CLASS_AVERAGED,
                                                 proportion, wilson_interval, one_vs_rest_counts,
                                                 likelihood_ratios, per_class_metrics,
                                                 confusion_matrices, metrics_from_confusion,
                                                 softmax, PROBABILITY_METRICS, label_probs,
                                                 without_probability_metrics)
from orbital_clip.metrics.calibration import (DEFAULT_ECE_BINS, LOG_LOSS_EPS, CALIBRATION_METRICS,
                                              brier_per_image, log_loss_per_image, calibration_bins,
                                              reliability_table, mean_nll, fit_temperature)
from orbital_clip.metrics.bootstrap import (BOOTSTRAP_CHUNK, tie_blocks, weighted_auroc_auprc,
                                            prepare_scores, weighted_metrics, group_indices,
                                            bootstrap_strata, canonical_strata, resample_weights,
                                            mark_unusable,
                                            unscored_classes,
                                            bootstrap_replicates, percentile_interval,
                                            finite_or_none, empty_metrics, compute_metrics,
                                            bootstrap_design, expected_random_average_precision,
                                            interval_levels)
from orbital_clip.metrics.operating import (rule_predictions, binary_summary,
                                            operating_point_metrics, patient_level_intervals,
                                            with_class_patient_intervals,
                                            intention_to_diagnose, operating_point, is_improvement,
                                            selection_metrics)
from orbital_clip.metrics.compare import (mcnemar_test, format_p, COMPARISON_METRICS,
                                          delong_placements, delong_test, obuchowski_test,
                                          prediction_columns, prediction_metrics, bootstrap_p,
                                          ComparedModel, comparison_rows, compare_predictions,
                                          add_paired_tests)
from orbital_clip.metrics.sequential import (SEQUENTIAL_MEASURES, cochrans_q, reading_successes,
                                             sequential_steps, paired_step_change,
                                             sequential_analysis)
from orbital_clip.metrics.subgroups import (SMALL_SUBGROUP_N, SMALL_SUBGROUP_RARE_N, BOOTSTRAP_COLUMNS,
                                            cannot_vary, stratified_homogeneity_test,
                                            INCONSISTENT_LEVEL, patient_levels,
                                            homogeneity_test, subgroup_rows, subgroup_analysis)

__all__ = ["DEFAULT_BOOTSTRAP", "DEFAULT_SEED", "CONFIDENCE_LEVEL", "OVERALL_METRICS",
           "PROPORTIONS", "CLASS_AVERAGED", "proportion", "wilson_interval", "one_vs_rest_counts",
           "likelihood_ratios", "per_class_metrics", "confusion_matrices",
           "metrics_from_confusion", "softmax", "PROBABILITY_METRICS", "label_probs",
           "without_probability_metrics", "DEFAULT_ECE_BINS", "LOG_LOSS_EPS",
           "CALIBRATION_METRICS", "brier_per_image", "log_loss_per_image", "calibration_bins",
           "reliability_table", "mean_nll", "fit_temperature", "BOOTSTRAP_CHUNK", "tie_blocks",
           "weighted_auroc_auprc", "prepare_scores", "weighted_metrics", "group_indices",
           "bootstrap_strata", "canonical_strata", "resample_weights", "mark_unusable", "unscored_classes",
           "bootstrap_replicates",
           "percentile_interval", "finite_or_none", "empty_metrics", "compute_metrics",
           "bootstrap_design", "expected_random_average_precision", "interval_levels",
           "rule_predictions", "binary_summary", "operating_point_metrics",
           "patient_level_intervals", "with_class_patient_intervals", "intention_to_diagnose", "operating_point", "is_improvement",
           "selection_metrics", "mcnemar_test", "format_p", "COMPARISON_METRICS",
           "delong_placements", "delong_test", "obuchowski_test", "prediction_columns",
           "prediction_metrics", "bootstrap_p", "ComparedModel", "comparison_rows",
           "compare_predictions", "add_paired_tests", "SEQUENTIAL_MEASURES", "cochrans_q",
           "reading_successes", "sequential_steps", "paired_step_change", "sequential_analysis",
           "SMALL_SUBGROUP_N", "SMALL_SUBGROUP_RARE_N", "BOOTSTRAP_COLUMNS", "cannot_vary", "stratified_homogeneity_test",
           "INCONSISTENT_LEVEL", "patient_levels", "homogeneity_test", "subgroup_rows",
           "subgroup_analysis"]
