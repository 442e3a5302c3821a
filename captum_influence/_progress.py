"""The package's one progress-bar style.

Every long loop goes through :func:`progress`: a bar only when it was asked for (``show_progress``)
and only where it can be drawn (``disable=None``: tqdm stays silent when stderr is not a terminal,
so logs and pipes get no escape codes; in a notebook ``tqdm.auto`` draws a widget); inner bars
(``inner=True``) are cleared when done, so only the outermost bar of a call stays on screen.
"""

from __future__ import annotations

from typing import Iterable, Optional, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    iterable: Optional[Iterable[T]] = None,
    *,
    desc: str,
    show: bool,
    total: Optional[int] = None,
    inner: bool = True,
    unit: str = "it",
) -> "tqdm[T]":
    """A tqdm bar over ``iterable`` (or of ``total`` steps, advanced by ``update()``).

    Args:
        iterable: what to loop over; None for a bar advanced by hand.
        desc: the bar's label.
        show: False never draws; True draws when stderr is a terminal or in a notebook.
        total: the number of steps (default ``len(iterable)``).
        inner: cleared when done (``leave=False``); False for the outermost bar of a call.
        unit: what one step is called.

    Returns:
        The tqdm bar, iterable like ``iterable``.
    """
    return tqdm(iterable, desc=desc, total=total, disable=None if show else True, leave=not inner, unit=unit)
