"""report.py: known answers of the tables and the text of report.md (no model, no torch)."""

import report


def test_format_value():
    assert report.format_value(None) == "n/a"
    assert report.format_value(0.83333, [0.5, 0.95]) == "0.833 (0.500–0.950)"
