"""The one batched-gradient backend under every method: per-example gradients, projection,
damped solves, blockwise scoring and the on-disk feature store."""

from .grads import VmapUnsupportedError, batch_size_of, iter_per_example_grads
from .input_grads import input_grads
from .layer_grads import LayerGrads, per_example_grads, projected_grads
from .params import param_shapes, select_param_names
from .projector import Projector
from .scoring import check_k, iter_score_blocks, merge_topk, scores, topk
from .sharding import fill_rows_sharded, rank_and_world, scores_sharded, shard_range, shared_array, topk_sharded
from .solve import auto_damping, cholesky_solve, damped_cholesky, damped_solve, gram
from .store import FeatureStore, fill_rows, release_pages

__all__ = [
    "FeatureStore",
    "LayerGrads",
    "Projector",
    "VmapUnsupportedError",
    "auto_damping",
    "batch_size_of",
    "check_k",
    "cholesky_solve",
    "damped_cholesky",
    "damped_solve",
    "fill_rows",
    "fill_rows_sharded",
    "gram",
    "input_grads",
    "iter_per_example_grads",
    "iter_score_blocks",
    "merge_topk",
    "param_shapes",
    "per_example_grads",
    "projected_grads",
    "rank_and_world",
    "release_pages",
    "scores",
    "scores_sharded",
    "select_param_names",
    "shard_range",
    "shared_array",
    "topk",
    "topk_sharded",
]
