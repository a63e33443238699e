"""Calibration: data sources, streaming observers, the one ORT pass, and the plan they produce."""
