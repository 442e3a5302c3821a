"""Which parameters a gradient is taken with respect to."""

from __future__ import annotations

from typing import Iterable, Union

import torch
from torch import nn

ParamSpec = Union[None, str, nn.Module, Iterable[Union[str, nn.Module]]]


def select_param_names(model: nn.Module, params: ParamSpec = None, *, arg: str = "params") -> list[str]:
    """Names of the parameters selected by ``params``, in ``model.named_parameters()`` order.

    ``params`` is None (every parameter that requires grad), a parameter name, a module path
    (all parameters below it), an ``nn.Module`` inside ``model``, or a list of these.
    A name or module that selects nothing raises ``ValueError`` naming ``arg``.
    """
    all_names = [name for name, p in model.named_parameters()]
    if params is None:
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise ValueError(f"{arg}: the model has no parameter that requires grad.")
        return names
    items = [params] if isinstance(params, (str, nn.Module)) else list(params)
    if not items:
        raise ValueError(f"{arg}: an empty selection; pass None for all parameters or name some.")
    module_names = {id(m): name for name, m in model.named_modules()}
    modules = dict(model.named_modules())
    name_of = {id(p): name for name, p in model.named_parameters()}
    chosen: set[str] = set()
    for item in items:
        if isinstance(item, nn.Module):
            if id(item) not in module_names:
                raise ValueError(f"{arg}: the module {type(item).__name__} given is not part of the model.")
            prefix = module_names[id(item)]
        elif isinstance(item, str):
            prefix = item
        else:
            raise TypeError(f"{arg}: expected parameter names, module paths or nn.Modules; got {type(item).__name__}.")
        hits = [n for n in all_names if n == prefix or prefix == "" or n.startswith(prefix + ".")]
        if prefix in modules:  # a module's own parameters, also those listed under a tied name
            hits += [name_of[id(p)] for p in modules[prefix].parameters()]
        if not hits:
            raise ValueError(
                f"{arg}: {prefix!r} names no parameter or module of the model; "
                f"parameters are: {', '.join(all_names[:12])}{' ...' if len(all_names) > 12 else ''}."
            )
        chosen.update(hits)
    return [n for n in all_names if n in chosen]


def param_shapes(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Size]:
    """``{name: shape}`` of the named parameters, in the given order."""
    table = dict(model.named_parameters())
    return {name: table[name].shape for name in names}
