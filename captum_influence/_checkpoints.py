"""Checkpoints: a directory, a list of paths or a list of state dicts, and their weights.

``checkpoints_load_func(model, checkpoint) -> float`` loads in place and returns the checkpoint's
weight (its learning rate), Captum's convention; the default loads a state dict and returns 1.0.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

Checkpoint = Union[str, os.PathLike, dict]
LoadFunc = Callable[[nn.Module, Any], float]


def _natural_key(path: Path) -> list:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path.name)]


def resolve_checkpoints(checkpoints: Union[Checkpoint, Sequence[Checkpoint]]) -> list[Checkpoint]:
    """The checkpoints as a list: a directory's files in natural order, paths, or state dicts."""
    if isinstance(checkpoints, (str, os.PathLike)):
        path = Path(checkpoints)
        if path.is_dir():
            files = sorted((p for p in path.iterdir() if p.is_file()), key=_natural_key)
            if not files:
                raise ValueError(f"checkpoints: the directory {str(path)!r} holds no files.")
            return [str(p) for p in files]
        if not path.exists():
            raise ValueError(f"checkpoints: {str(path)!r} does not exist.")
        return [str(path)]
    if isinstance(checkpoints, dict):
        return [checkpoints]
    if not isinstance(checkpoints, Sequence) or not checkpoints:
        raise ValueError(
            f"checkpoints: expected a directory, a non-empty list of paths or state dicts; got {checkpoints!r:.80}."
        )
    for i, c in enumerate(checkpoints):
        if not isinstance(c, (str, os.PathLike, dict)):
            raise TypeError(f"checkpoints: item {i} is a {type(c).__name__}; expected a path or a state dict.")
        if not isinstance(c, dict) and not Path(c).is_file():
            raise ValueError(f"checkpoints: item {i} ({str(c)!r}) is not a file.")
    return list(checkpoints)


def default_load(model: nn.Module, checkpoint: Checkpoint) -> float:
    """Load a state dict (or a file holding one, also under 'state_dict' / 'model_state_dict'); weight 1.0."""
    if isinstance(checkpoint, dict):
        state = checkpoint
    else:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load's errors on a file that is not a saved state dict vary
            raise ValueError(
                f"checkpoints: {str(checkpoint)!r} cannot be read by torch.load ({type(err).__name__}: {err}"
                f"); expected a file written by torch.save(model.state_dict(), path), or pass checkpoints_load_func."
            ) from err
    if not isinstance(state, dict):
        raise ValueError(
            f"checkpoints: {str(checkpoint)!r} holds a {type(state).__name__}; expected a state dict "
            "(or pass checkpoints_load_func to load it)."
        )
    for key in ("state_dict", "model_state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
    model.load_state_dict(state)
    return 1.0


def load_checkpoint(model: nn.Module, checkpoint: Checkpoint, load_func: Optional[LoadFunc], index: int) -> float:
    """Load checkpoint ``index`` into ``model`` and return its weight, with clear errors."""
    name = checkpoint if not isinstance(checkpoint, dict) else f"state dict #{index}"
    try:
        weight = (load_func or default_load)(model, checkpoint)
    except RuntimeError as err:
        if "state_dict" not in str(err):
            raise
        raise ValueError(f"checkpoints: checkpoint {index} ({name}) does not match the model: {err}") from err
    if isinstance(weight, torch.Tensor) and weight.numel() == 1:
        weight = float(weight)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise TypeError(
            "checkpoints_load_func: must return the checkpoint's weight (its learning rate) as a finite "
            f"float; for checkpoint {index} it returned {weight!r}."
        )
    return float(weight)
