"""Export: the QDQ model and its measured fidelity against the float model."""
