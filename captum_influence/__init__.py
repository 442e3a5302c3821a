"""captum_influence: data and feature attribution beside Captum.

Which training examples made a model say this (TRAK, TracIn) and which input features did
(Integrated Gradients with completeness checks), on one batched-gradient backend.
"""

from . import metrics, tasks, visualization
from ._backend import Projector, per_example_grads
from .completeness import CompletenessReport, check_completeness
from .ekfac import EKFACInfluence
from .influence_functions import ArnoldiInfluenceFunction, NaiveInfluenceFunction
from .integrated_gradients import IntegratedGradients, LayerIntegratedGradients
from .output_selection import find_output_nonlinearities, select_output
from .rrr import RRRLoss
from .similarity import SimilarityInfluence
from .tracin import TracInCP, TracInCPFast
from .tracin_fast_rand_proj import TracInCPFastRandProj
from .trak import TRAK

__version__ = "0.1.0"

__all__ = [
    "ArnoldiInfluenceFunction",
    "CompletenessReport",
    "EKFACInfluence",
    "IntegratedGradients",
    "LayerIntegratedGradients",
    "NaiveInfluenceFunction",
    "Projector",
    "RRRLoss",
    "SimilarityInfluence",
    "TRAK",
    "TracInCP",
    "TracInCPFast",
    "TracInCPFastRandProj",
    "check_completeness",
    "find_output_nonlinearities",
    "metrics",
    "per_example_grads",
    "select_output",
    "tasks",
    "visualization",
]
