"""Table 1 of a paper (values in, frames and text out): the cohort's characteristics by split, site
or class: images and patients, the classes, and each --metadata attribute (a numeric one as median
[IQR] or mean (SD), a categorical one as n (%)) with the share of patients missing it.

Our own rather than `tableone`'s: tableone summarises rows, and here a row is an image while age,
sex and race describe a patient, who must be counted once per column however many images they have
(two eyes, several visits). tableone would need one frame per level of counting and could still
not put the image and patient counts in one table.
"""

import pandas as pd

CONTINUOUS_STYLES = ("median", "mean")  # median [Q1, Q3] (skewed ages), or mean (SD)
OVERALL = "overall"
MISSING = "missing"
TABLE1_COLUMNS = ("characteristic", "level")  # then one column per stratum, then OVERALL


def is_numeric(values):
    """Whether every non-empty cell is a number (then the attribute is summarised as one)."""
    cells = pd.Series(values, dtype=object).map(lambda v: str(v).strip())
    cells = cells[cells != ""]
    return bool(len(cells)) and pd.to_numeric(cells, errors="coerce").notna().all()


def patient_values(frame, group_col, column):
    """One value per patient: the most common non-empty cell among their images (ties: the
    first in sorted order), '' when none; images of one patient may disagree (age at two visits)."""
    cells = frame[column].map(lambda v: str(v).strip())
    out = {}
    for patient, values in cells.groupby(frame[group_col], sort=True):
        counts = values[values != ""].value_counts()
        out[patient] = "" if counts.empty else sorted(counts[counts == counts.max()].index)[0]
    return pd.Series(out, dtype=object)


def percent(k, n):
    return f"{k} ({100.0 * k / n:.1f}%)" if n else f"{k}"


def continuous_cell(values, style):
    """'52.0 [41.0, 63.5]' or '51.2 (11.8)' of the non-missing values; '—' when there are none."""
    values = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").dropna()
    if values.empty:
        return "—"
    if style == "mean":
        return f"{values.mean():.1f} ({values.std(ddof=1):.1f})" if len(values) > 1 else f"{values.mean():.1f}"
    q1, median, q3 = values.quantile([0.25, 0.5, 0.75])  # linear interpolation, as numpy's default
    return f"{median:.1f} [{q1:.1f}, {q3:.1f}]"


def column_cells(frame, folders, attributes, levels, style, class_col, group_col):
    """{(characteristic, level): cell} of one column (a stratum's images, or all of them)."""
    n_images, n_patients = len(frame), frame[group_col].nunique()
    cells = {("images", "n"): str(n_images), ("patients", "n"): str(n_patients)}
    for folder in folders:
        mine = frame[frame[class_col] == folder]
        cells[("class, images", folder)] = percent(len(mine), n_images)
        cells[("class, patients", folder)] = percent(mine[group_col].nunique(), n_patients)
    for column in attributes:
        per_patient = patient_values(frame, group_col, column)
        missing = int((per_patient == "").sum())
        if levels[column] is None:  # numeric
            label = f"{column}, {'median [IQR]' if style == 'median' else 'mean (SD)'}"
            cells[(label, "")] = continuous_cell(per_patient[per_patient != ""], style)
        else:
            for level in levels[column]:
                cells[(column, level)] = percent(int((per_patient == level).sum()), n_patients)
        cells[(column, MISSING)] = percent(missing, n_patients)
    return cells


def table1(frame, folders, by, attributes=(), style="median", strata=None, class_col="label",
           group_col="group"):
    """Table 1: one row per (characteristic, level), one column per level of `by` (in the order
    of `strata`, else sorted) and an OVERALL column. Image counts count images; patient counts,
    the attributes and their shares count each patient once per column (`patient_values`); the
    shares of an attribute are of the column's patients, missing ones included.

    Parameters
    ----------
    frame : DataFrame, one row per image, with `by`, `class_col`, `group_col` and the attributes
    folders : the class names in their order
    """
    if style not in CONTINUOUS_STYLES:
        raise ValueError(f"continuous style {style!r}: expected one of {CONTINUOUS_STYLES}")
    frame = frame.fillna("")
    strata = list(strata) if strata is not None else sorted(frame[by].astype(str).unique())
    # every value recorded for an image is a row, even where no patient takes it as theirs
    levels = {column: None if is_numeric(frame[column]) else
              sorted(set(frame[column].map(lambda v: str(v).strip())) - {""}) for column in attributes}
    columns = {str(s): column_cells(frame[frame[by].astype(str) == str(s)], folders, attributes,
                                    levels, style, class_col, group_col) for s in strata}
    columns[OVERALL] = column_cells(frame, folders, attributes, levels, style, class_col, group_col)
    order = list(dict.fromkeys(key for cells in [columns[OVERALL], *columns.values()] for key in cells))
    names = list(dict.fromkeys(name for name, _level in order))
    keys = sorted(order, key=lambda key: names.index(key[0]))  # levels stay under their attribute
    # a level no patient of a column has: 0 of that column's patients
    rows = [{"characteristic": name, "level": level,
             **{s: cells.get((name, level)) or percent(0, int(cells[("patients", "n")]))
                for s, cells in columns.items()}} for name, level in keys]
    return pd.DataFrame(rows, columns=[*TABLE1_COLUMNS, *columns])


def table1_markdown(table, by, note=""):
    """Table 1 as a Markdown table, each characteristic named once."""
    strata = list(table.columns[len(TABLE1_COLUMNS):])
    lines = [f"| characteristic | {' | '.join(f'{by} = {s}' if s != OVERALL else s for s in strata)} |",
             "| --- |" + " ---: |" * len(strata)]
    for row in table.itertuples(index=False):
        name, level = row[0], row[1]
        label = name if level in ("", "n") else f"{name}: {level}"
        lines.append(f"| {label} | " + " | ".join(str(v) for v in row[2:]) + " |")
    return lines + ([""] + [note] if note else [])
