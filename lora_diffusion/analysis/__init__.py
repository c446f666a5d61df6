"""Analyses of trained adapters: each returns a report of plain data (figures are in `plots.py`)."""
