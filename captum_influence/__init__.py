"""captum_influence: data and feature attribution beside Captum.

Which training examples made a model say this (TRAK, TracIn) and which input features did
(Integrated Gradients with completeness checks), on one batched-gradient backend.
"""

from ._backend import Projector, per_example_grads
from . import metrics, visualization

__version__ = "0.1.0"

__all__ = ["Projector", "metrics", "per_example_grads", "visualization"]
