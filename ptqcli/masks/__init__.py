"""N:M sparsity masks, including transposable ones."""
