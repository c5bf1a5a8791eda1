"""The tables, figures and report.md of an evaluation (values in, frames, figures or text out),
one kind per module: `tables` (predictions.csv, per_class_metrics.csv, confusion_matrix.csv,
comparison.csv, the STARD flow), `markdown` (report.md with its reporting-checklist map) and
`figures` (the journal figures, one style, one save function). Statistics come from
orbital_clip.metrics; the pipelines (scoring, answers, evaluation) decide what is written where.
Every public name is re-exported here, so `from orbital_clip import report` keeps working.
"""

from orbital_clip.report.tables import (METRIC_LABELS, relative_path, predictions_frame, scrub,
                                        confusion_frame, per_class_frame, COMPARISON_LABELS,
                                        COMPARISON_P_COLUMNS, rare_summary, summary_row,
                                        comparison_frame, failure_category, flow_counts,
                                        most_confident_errors, sequential_frame,
                                        sequential_changes_frame, SUBGROUP_COLUMNS, subgroups_frame,
                                        format_value, short_model_name, table2_frame, primary_p)
from orbital_clip.report.markdown import (failure_markdown, flow_markdown, metrics_markdown,
                                          resample_notes, comparison_resample_notes,
                                          unanswered_notes, levels_markdown, operating_markdown,
                                          comparison_markdown, CHECKLIST_NOTE, CHECKLIST_ROWS,
                                          report_header, itd_markdown, answers_header, FIGURES,
                                          independence_warning, render_report, sequential_markdown,
                                          heterogeneity_text, subgroups_markdown, table2_markdown)
from orbital_clip.report.figures import (FIGURE_NAMES, PANEL_WIDTH_IN, PANEL_HEIGHT_IN, FONT_PT,
                                         FIGURE_DPI, figure_style, panel_grid, save_figure, wrap,
                                         plot_confusion_matrices, mark_operating_points,
                                         operating_markers, plot_roc_curves, plot_pr_curves,
                                         plot_calibration, plot_prob_histograms, write_figures,
                                         plot_sequential, forest_rows, plot_forest, plot_comparison,
                                         plot_subgroups, legend_below, proportion_limits)

__all__ = ["METRIC_LABELS", "relative_path", "predictions_frame", "scrub", "confusion_frame",
           "per_class_frame", "COMPARISON_LABELS", "COMPARISON_P_COLUMNS", "rare_summary",
           "summary_row", "comparison_frame", "failure_category", "flow_counts",
           "most_confident_errors", "sequential_frame", "sequential_changes_frame",
           "SUBGROUP_COLUMNS", "subgroups_frame", "format_value", "failure_markdown",
           "flow_markdown", "metrics_markdown", "resample_notes", "comparison_resample_notes",
           "unanswered_notes", "levels_markdown", "operating_markdown", "comparison_markdown",
           "CHECKLIST_NOTE", "CHECKLIST_ROWS", "report_header", "itd_markdown", "answers_header",
           "FIGURES", "independence_warning", "render_report", "sequential_markdown",
           "heterogeneity_text", "subgroups_markdown", "FIGURE_NAMES", "PANEL_WIDTH_IN",
           "PANEL_HEIGHT_IN", "FONT_PT", "FIGURE_DPI", "figure_style", "panel_grid", "save_figure",
           "wrap", "plot_confusion_matrices", "mark_operating_points", "operating_markers",
           "plot_roc_curves", "plot_pr_curves", "plot_calibration", "plot_prob_histograms",
           "write_figures", "plot_sequential", "forest_rows", "plot_forest", "plot_comparison",
           "plot_subgroups", "short_model_name", "table2_frame", "primary_p", "table2_markdown", "legend_below", "proportion_limits"]
