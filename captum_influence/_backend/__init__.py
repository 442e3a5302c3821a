"""The one batched-gradient backend under every method: per-example gradients, projection,
damped solves, blockwise scoring and the on-disk feature store."""

from .grads import VmapUnsupportedError, batch_size_of, iter_per_example_grads, per_example_grads
from .input_grads import input_grads
from .params import param_shapes, select_param_names
from .projector import Projector
from .scoring import check_k, iter_score_blocks, merge_topk, scores, topk
from .solve import auto_damping, cholesky_solve, damped_cholesky, damped_solve, gram
from .store import FeatureStore, fill_rows

__all__ = [
    "FeatureStore",
    "Projector",
    "VmapUnsupportedError",
    "auto_damping",
    "batch_size_of",
    "check_k",
    "cholesky_solve",
    "damped_cholesky",
    "damped_solve",
    "fill_rows",
    "gram",
    "input_grads",
    "iter_per_example_grads",
    "iter_score_blocks",
    "merge_topk",
    "param_shapes",
    "per_example_grads",
    "scores",
    "select_param_names",
    "topk",
]
