"""Analyses that return plain data (and, for the app and notebooks, plotly figures)."""
