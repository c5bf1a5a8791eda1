"""Orbital-CLIP: fine-tune CLIP on a small, imbalanced clinical cohort and evaluate it with the
statistics a journal asks for. The scripts at the top of the clone are the entry points; this
package holds their machinery, one concern per module."""
