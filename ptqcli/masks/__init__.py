"""N:M sparsity masks, including transposable ones."""

from ..geometry import matrix_to_weight, weight_to_matrix
from .nm import Diversity, mask_diversity, nm_mask, tail_keep, transposable_block_count
from .transposable import transposable_mask

__all__ = [
    "Diversity",
    "mask_diversity",
    "matrix_to_weight",
    "nm_mask",
    "tail_keep",
    "transposable_block_count",
    "transposable_mask",
    "weight_to_matrix",
]
