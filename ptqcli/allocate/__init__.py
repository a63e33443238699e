"""Per-layer bit-width allocation under a budget (integer programming)."""
