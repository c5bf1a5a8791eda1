"""WiSE-FT on validation: the mixing weight between the starting and the fine-tuned weights."""

import logging
import math
from pathlib import Path

import pandas as pd

from orbital_clip import checkpoint
from orbital_clip import outputs
from orbital_clip.train.checkpoints import BEST_NAME
from orbital_clip.train.loop import validate

LOG = logging.getLogger("clip_train")  # one logger for the whole training command


def choose_wise_ft_alpha(model, ctx, val_loader, base_state):
    """WiSE-FT on validation: evaluate (1 - a) * start + a * best weights for each --wise-ft-alphas
    value, record the grid and the chosen alpha in the best checkpoint (its weights unchanged)."""
    args, save_dir = ctx["args"], Path(ctx["args"].save_dir)
    best = checkpoint.read_checkpoint(save_dir / BEST_NAME)
    rows = []
    for alpha in args.wise_ft_alphas:
        model.load_state_dict(checkpoint.interpolate_state_dicts(base_state, best.state_dict, alpha))
        rows.append({"alpha": alpha, **validate(model, val_loader, ctx)})  # every metric
    values = [row[args.select_metric] for row in rows]
    finite = [(v, i) for i, v in enumerate(values) if not math.isnan(v)]
    pick = min if args.select_metric == "val_loss" else max
    chosen = rows[pick(finite)[1]]["alpha"] if finite else 1.0
    # The weights stored stay the fine-tuned ones (alpha 1), and so do the top-level threshold
    # and temperature; those validated at each alpha (the chosen one first) sit beside them, for
    # inference --wise-ft-alpha.
    calibration = {str(row["alpha"]): {"threshold": row["operating_threshold"],
                                       "val_sensitivity": row["operating_val_sensitivity"],
                                       "val_specificity": row["operating_val_specificity"],
                                       "temperature": row["temperature"]} for row in rows}
    best.wise_ft = outputs.plain({"base": "pretrained" if args.pretrained != "none" else "initial weights (seeded)",
                       "alphas": list(args.wise_ft_alphas), "metric": args.select_metric,
                       "values": values, "chosen_alpha": chosen,
                       "chosen_calibration": calibration[str(chosen)] if str(chosen) in calibration else None,
                       "calibration": calibration})
    checkpoint.write_checkpoint(save_dir / BEST_NAME, best)
    outputs.atomic_write_csv(save_dir / "wise_ft_validation.csv", pd.DataFrame(rows))
    model.load_state_dict(best.state_dict)
    LOG.info("WiSE-FT on validation: %s by alpha %s -> chosen alpha %s", args.select_metric,
             list(args.wise_ft_alphas), chosen)
    return chosen
