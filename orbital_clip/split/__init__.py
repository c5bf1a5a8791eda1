"""Splitting a cohort (data_preprocess.py), one concern per module: records (what the steps pass
each other), scan (listing and reading the cohort), grouping (patients), duplicates (the leakage
audit), allocate (splits and folds), manifest (the tables), materialise (writing the split
folders, the move journal) and cli (the command line)."""

from orbital_clip.split.cli import main

__all__ = ["main"]
