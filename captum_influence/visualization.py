"""Plots for feature attributions and data attribution, in the style of ``captum.attr.visualization``.

Every ``plot_*`` function takes torch tensors or numpy arrays, returns ``(fig, ax)`` and never
calls ``plt.show()``; those that draw on a single axes accept ``ax=`` to draw into an existing one.
``plot_attributions`` also takes ``captum.attr.visualization.visualize_image_attr``'s arguments in
its order, so it can replace that function in Captum code.
"""

from __future__ import annotations

import colorsys
import html
from typing import Any, Optional, Sequence, Union

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.transforms import offset_copy

from ._arrays import as_array, as_mask, check_length, squeeze_leading
from .metrics import mislabel_detection_auc, spearman

__all__ = [
    "attributions_to_html",
    "plot_attributions",
    "plot_completeness",
    "plot_influential",
    "plot_lds",
    "plot_self_influence",
]

METHODS = ("heat_map", "blended_heat_map", "original_image", "masked_image", "alpha_scaling")
SIGNS = ("all", "positive", "negative", "absolute_value")
KINDS = ("auto", "image", "tabular", "text")

# Captum's colours: green helps, red hurts
_POSITIVE, _NEGATIVE = "#2ca02c", "#d62728"
_MISLABELED = "#d62728"
_CMAPS = {
    "all": (LinearSegmentedColormap.from_list("RdWhGn", ["red", "white", "green"]), -1.0, 1.0),
    "positive": ("Greens", 0.0, 1.0),
    "negative": ("Reds", 0.0, 1.0),
    "absolute_value": ("Blues", 0.0, 1.0),
}


def _check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}; got {value!r}.")


def _new_axes(ax: Optional[Axes], fig_size: tuple[float, float], use_pyplot: bool = True) -> tuple[Any, Axes]:
    if ax is None:
        if use_pyplot:
            return plt.subplots(figsize=fig_size)
        fig = Figure(figsize=fig_size)  # not registered with pyplot: never shown, no global state
        return fig, fig.subplots()
    if not isinstance(ax, Axes):
        raise TypeError(f"ax: expected a matplotlib Axes; got {type(ax).__name__}.")
    return ax.figure, ax


def _figure(ax: Axes) -> Figure:
    """The figure holding ``ax`` (the root figure when ``ax`` is on a subfigure)."""
    fig = ax.get_figure(root=True)
    if fig is None:
        raise ValueError("ax: the Axes is on no Figure; make it with plt.subplots() or fig.add_subplot().")
    return fig


def _apply_sign(attr: np.ndarray, sign: str) -> np.ndarray:
    if sign == "positive":
        return np.maximum(attr, 0)
    if sign == "negative":
        return np.minimum(attr, 0)
    if sign == "absolute_value":
        return np.abs(attr)
    return attr


def _scale(attr: np.ndarray, sign: str, outlier_perc: float) -> float:
    """Captum's scale t: the magnitude at which the sorted |attr| of the chosen sign reach
    (100 - outlier_perc)% of their total (0.0 when they are all zero)."""
    mags = np.sort(np.abs(_apply_sign(attr, sign)).ravel())
    cum = np.cumsum(mags)
    if cum[-1] == 0:
        return 0.0
    # the min() guards against rounding pushing the target just past the total when outlier_perc = 0
    return float(mags[min(np.searchsorted(cum, cum[-1] * 0.01 * (100.0 - outlier_perc)), mags.size - 1)])


def _check_scale(scale: Optional[float]) -> None:
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale <= 0
    ):
        raise ValueError(
            f"scale: expected a positive number (the |attribution| drawn at full colour) or None; got {scale!r}."
        )


def _normalize(
    attr: np.ndarray, sign: str, outlier_perc: float, scale: Optional[float] = None
) -> tuple[np.ndarray, float]:
    """Captum's scaling: keep the chosen sign, divide by the scale t (``scale``, or Captum's
    outlier-percentile threshold), clip to [-1, 1]. ``negative`` maps to [0, 1]. Returns (values, t)."""
    signed = _apply_sign(attr, sign)
    t = _scale(attr, sign, outlier_perc) if scale is None else float(scale)
    if t == 0:
        return np.zeros_like(signed), t
    return np.clip(signed / (-t if sign == "negative" else t), -1, 1), t


def _signed_weights(
    attr: np.ndarray, sign: str, outlier_perc: float, scale: Optional[float] = None
) -> tuple[np.ndarray, float]:
    """Normalised attributions in [-1, 1] whose sign is the attribution's (for colouring tokens), and the scale."""
    norm, t = _normalize(attr, sign, outlier_perc, scale)
    return (-norm if sign == "negative" else norm), t


def _legend_entries(sign: str, scale: float) -> list[tuple[str, float]]:
    """(text, weight) of the colour key of highlighted tokens: the ends of the scale and zero."""
    t = f"{scale:.2g}"
    if sign == "all":
        return [(f"-{t} lowers the output", -1.0), ("0", 0.0), (f"+{t} raises it", 1.0)]
    if sign == "negative":
        return [(f"-{t} lowers the output", -1.0), ("0", 0.0)]
    return [("0", 0.0), (f"{'|attribution| ' if sign == 'absolute_value' else '+'}{t}", 1.0)]


_COLORBAR_LABELS = {
    "all": "attribution: - lowers the output, + raises it",
    "positive": "positive attribution (raises the output)",
    "negative": "negative attribution (lowers the output)",
    "absolute_value": "|attribution|",
}


def _colorbar(ax: Axes, mappable: ScalarMappable, sign: str, scale: float, clipped: bool) -> Any:
    """A horizontal colour bar under ``ax`` whose ticks read in attribution units, with the sign's meaning."""
    bar = ax.figure.colorbar(
        mappable,
        ax=ax,
        orientation="horizontal",
        fraction=0.046,
        pad=0.04,
        extend="both" if clipped and sign == "all" else ("max" if clipped else "neither"),
    )
    t = f"{scale:.2g}"
    if sign == "all":
        bar.set_ticks([-1.0, 0.0, 1.0], labels=[f"-{t}", "0", f"+{t}"])
    else:
        bar.set_ticks([0.0, 1.0], labels=["0", f"-{t}" if sign == "negative" else t])
    bar.set_label(_COLORBAR_LABELS[sign], fontsize=8)
    bar.ax.tick_params(labelsize=8)
    return bar


def _token_rgb(weight: float) -> tuple[float, float, float]:
    """Captum's text colours: green for positive, red for negative, paler when smaller."""
    w = float(np.clip(weight, -1, 1))
    hue, lightness = (120, 1 - 0.5 * w) if w > 0 else (0, 1 + 0.4 * w)
    return colorsys.hls_to_rgb(hue / 360, lightness, 0.75)


def _delta_text(delta: Any) -> str:
    d = as_array(delta, "delta").ravel()
    if d.size != 1:
        raise ValueError(f"delta: expected one completeness delta for one example; got {d.size} values.")
    return f"completeness delta = {d[0]:+.2e}"


def _title(title: Optional[str], delta: Any) -> Optional[str]:
    parts = [p for p in (title, None if delta is None else _delta_text(delta)) if p]
    return "\n".join(parts) if parts else None


def _fig_axis(plt_fig_axis: Any, ax: Optional[Axes]) -> tuple[Any, Axes]:
    """Captum's ``plt_fig_axis=(figure, axes)``, checked: an Axes drawn on that figure, and no ``ax=`` too."""
    if ax is not None:
        raise ValueError("plt_fig_axis: got both plt_fig_axis and ax; pass the axes to draw on once.")
    if not (isinstance(plt_fig_axis, (tuple, list)) and len(plt_fig_axis) == 2 and isinstance(plt_fig_axis[1], Axes)):
        raise TypeError(f"plt_fig_axis: expected a (Figure, Axes) pair; got {plt_fig_axis!r}.")
    fig, given = plt_fig_axis
    if fig is not given.figure and fig is not given.get_figure(root=True):
        raise ValueError("plt_fig_axis: the Axes is not on the given Figure; pass (ax.figure, ax).")
    return fig, given


def _check_outlier_perc(outlier_perc: float) -> None:
    if isinstance(outlier_perc, bool) or not isinstance(outlier_perc, (int, float)) or not 0 <= outlier_perc < 100:
        raise ValueError(f"outlier_perc: expected a number in [0, 100); got {outlier_perc!r}.")


# ---------------------------------------------------------------- images


def _as_image(x: Any, name: str, channels_last: Optional[bool]) -> np.ndarray:
    """(H, W) or (H, W, C) from (H, W), (C, H, W), (H, W, C) or a batch of one of those."""
    a = as_array(x, name, ndim=(2, 3, 4), keep_dtype=True)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"{name}: expected one image; got a batch of shape {a.shape}.")
        a = a[0]
    if a.ndim == 2:
        return a
    if channels_last is None:
        first, last = a.shape[0] in (1, 3), a.shape[2] in (1, 3)
        if first == last:
            raise ValueError(
                f"{name}: cannot tell the channel axis of shape {a.shape}; pass channels_last=True or False."
            )
        channels_last = last
    return a if channels_last else np.moveaxis(a, 0, -1)


def _unit_range(images: list[np.ndarray]) -> list[np.ndarray]:
    """Images in [0, 1] for display, one scale for all: integers are read as 0..255, floats
    already in [0, 1] are kept, anything else is min-max rescaled."""
    if all(np.issubdtype(im.dtype, np.integer) for im in images):
        return [im.astype(np.float64) / 255 for im in images]
    lo = min(float(im.min()) for im in images)
    hi = max(float(im.max()) for im in images)
    if 0 <= lo and hi <= 1:
        return [im.astype(np.float64) for im in images]
    span = hi - lo if hi > lo else 1.0
    return [(im.astype(np.float64) - lo) / span for im in images]


def _display(image: np.ndarray, name: str) -> np.ndarray:
    """A unit-range image as (H, W) grey or (H, W, 3) colour."""
    if image.ndim == 3:
        if image.shape[2] == 1:
            return image[:, :, 0]
        if image.shape[2] != 3:
            raise ValueError(f"{name}: expected 1 or 3 channels; got {image.shape[2]} (shape {image.shape}).")
    return image


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


def _plain_image_axes(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_image(
    ax: Axes,
    attr: Any,
    inputs: Any,
    method: str,
    sign: str,
    outlier_perc: float,
    cmap: Any,
    alpha_overlay: float,
    channels_last: Optional[bool],
    show_colorbar: Optional[bool],
    scale: Optional[float],
) -> None:
    _check_choice(method, "method", METHODS)
    if sign == "all" and method in ("masked_image", "alpha_scaling"):
        raise ValueError(f"sign: 'all' cannot be shown with method={method!r} (signed values need a colour map).")
    a = _as_image(attr, "attributions", channels_last).astype(np.float64)
    if a.ndim == 3:
        a = a.sum(axis=2)  # one value per pixel, as Captum
    image = np.zeros(a.shape)  # drawn only by methods that need the inputs, which are then checked
    if inputs is not None:
        raw = _as_image(inputs, "inputs", channels_last)
        if raw.shape[:2] != a.shape:
            raise ValueError(
                f"inputs: image of height and width {raw.shape[:2]} does not match attributions {a.shape}."
            )
        image = _display(_unit_range([raw])[0], "inputs")
    elif method != "heat_map":
        raise ValueError(f"inputs: method={method!r} needs the original image; got None.")
    norm, t = _normalize(a, sign, outlier_perc, scale)
    default_cmap, vmin, vmax = _CMAPS[sign]
    cmap = default_cmap if cmap is None else cmap
    heat = None
    if method == "heat_map":
        heat = ax.imshow(norm, cmap=cmap, vmin=vmin, vmax=vmax)
    elif method == "blended_heat_map":
        ax.imshow(image if image.ndim == 2 else image.mean(axis=2), cmap="gray", vmin=0, vmax=1)
        heat = ax.imshow(norm, cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha_overlay)
    elif method == "original_image":
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
    elif method == "masked_image":
        ax.imshow(_rgb(image) * norm[:, :, None])
    else:
        ax.imshow(np.concatenate([_rgb(image), norm[:, :, None]], axis=2))
    _plain_image_axes(ax)
    if show_colorbar is None:
        show_colorbar = heat is not None
    if show_colorbar:
        # as Captum: without a heat map the colour bar's axes is still made, and hidden, so that
        # panels with and without a heat map line up
        mappable = ScalarMappable(Normalize(vmin, vmax), cmap) if heat is None else heat
        clipped = t > 0 and bool((np.abs(_apply_sign(a, sign)) > t * (1 + 1e-9)).any())
        bar = _colorbar(ax, mappable, sign, t, clipped)
        if heat is None:
            bar.ax.set_axis_off()


# ---------------------------------------------------------------- tabular and text


def _one_row(x: Any, name: str) -> np.ndarray:
    a = squeeze_leading(as_array(x, name))
    if a.ndim != 1:
        raise ValueError(f"{name}: expected one example's values of shape (n,) or (1, n); got shape {a.shape}.")
    return a


def _plot_tabular(
    ax: Axes,
    attr: Any,
    inputs: Any,
    sign: str,
    feature_names: Optional[Sequence[str]],
    max_features: Optional[int],
) -> None:
    values = _apply_sign(_one_row(attr, "attributions"), sign)
    n = values.size
    names = [f"feature {i}" for i in range(n)] if feature_names is None else [str(f) for f in feature_names]
    if len(names) != n:
        raise ValueError(f"feature_names: expected {n} names, one per attribution; got {len(names)}.")
    if inputs is not None:
        x = _one_row(inputs, "inputs")
        check_length(x, "inputs", n, "attribution")
        names = [f"{nm} = {v:.3g}" for nm, v in zip(names, x)]
    order = np.arange(n)
    if max_features is not None:
        if isinstance(max_features, bool) or not isinstance(max_features, int) or max_features < 1:
            raise ValueError(f"max_features: expected a positive int or None; got {max_features!r}.")
        order = np.argsort(-np.abs(values), kind="stable")[:max_features]
    y = np.arange(order.size)
    ax.barh(y, values[order], color=[_POSITIVE if v >= 0 else _NEGATIVE for v in values[order]])
    ax.set_yticks(y, [names[i] for i in order])
    ax.invert_yaxis()  # first feature on top
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("|attribution|" if sign == "absolute_value" else "attribution")
    if order.size < n:
        ax.set_ylabel(f"top {order.size} of {n} features by |attribution|")


def _plot_text(ax: Axes, tokens: Sequence[str], weights: np.ndarray, fontsize: float, legend: Optional[list]) -> int:
    """Tokens as coloured boxes, wrapped to the axes' width, then (``legend``: (text, weight) pairs)
    a line with the colour key in a smaller font; returns the number of lines."""
    ax.set_axis_off()
    fig = _figure(ax)
    axes_width = ax.get_window_extent().width
    line_height = 2.0 * fontsize  # points
    x, line = 0.0, 0

    def place(token: str, weight: Optional[float], size: float) -> None:
        nonlocal x, line
        gap = 0.6 * size * fig.dpi / 72  # pixels: the box padding on both sides plus a space
        box = (
            None
            if weight is None
            else {"boxstyle": "round,pad=0.2", "facecolor": _token_rgb(weight), "edgecolor": "none"}
        )
        text = ax.text(x, 1.0, token, fontsize=size, va="top", parse_math=False, bbox=box)
        width = (text.get_window_extent().width + gap) / axes_width
        if x > 0 and x + width > 1:
            x, line = 0.0, line + 1
            text.set_x(0.0)
        text.set_transform(offset_copy(ax.transAxes, fig=fig, y=-line * line_height, units="points"))
        x += width

    for token, w in zip(tokens, weights):
        place(str(token), w, fontsize)
    if legend:
        x, line = 0.0, line + 1
        place("colour key:", None, 0.75 * fontsize)
        for text, w in legend:
            place(text, w, 0.75 * fontsize)
    return line + 1


def attributions_to_html(
    tokens: Sequence[str],
    attributions: Any,
    *,
    sign: str = "all",
    outlier_perc: float = 2,
    delta: Any = None,
    scale: Optional[float] = None,
    legend: bool = True,
) -> str:
    """Tokens highlighted by attribution as an HTML string (``IPython.display.HTML(...)`` shows it).

    Colours as ``captum.attr.visualization.visualize_text``: green positive, red negative, after
    the same normalisation as images; hovering a token shows its raw attribution.

    Args:
        tokens: the n tokens, as shown.
        attributions: their n attributions, shape (n,) or (1, n).
        sign: "all", "positive", "negative" or "absolute_value": which attributions are coloured.
        outlier_perc: the percentage of the total |attribution| above Captum's scale t (full colour).
        delta: the completeness error sum(attr) - (F(x) - F(x')) of this example, written above.
        scale: the |attribution| drawn at full colour instead of t; pass the same value to compare
            several sentences on one scale.
        legend: add a colour key (the scale's ends and zero) after the tokens.

    Returns:
        The HTML string: an optional ``<p>`` with the delta and a ``<div>`` of ``<mark>`` tokens.
    """
    _check_choice(sign, "sign", SIGNS)
    _check_outlier_perc(outlier_perc)
    _check_scale(scale)
    attr = _one_row(attributions, "attributions")
    check_length(attr, "attributions", len(tokens), "token")

    def mark(text: str, weight: float, hover: str) -> str:
        r, g, b = (round(255 * c) for c in _token_rgb(weight))
        return (
            f'<mark style="background-color: rgb({r}, {g}, {b}); padding: 0 0.2em; line-height: 1.75" '
            f'title="{hover}">{html.escape(text)}</mark>'
        )

    weights, t = _signed_weights(attr, sign, outlier_perc, scale)
    marks = [mark(str(token), w, f"{a:.4g}") for token, a, w in zip(tokens, attr, weights)]
    key = ""
    if legend:
        entries = " ".join(mark(text, w, "colour key") for text, w in _legend_entries(sign, t))
        key = f'<div class="captum-influence-key" style="font-size: 80%; margin-top: 0.3em">colour key: {entries}</div>'
    header = "" if delta is None else f"<p>{html.escape(_delta_text(delta))}</p>"
    return f'{header}<div class="captum-influence-text">{" ".join(marks)}</div>{key}'


def plot_attributions(
    attributions: Any,
    inputs: Any = None,
    method: str = "heat_map",
    sign: Optional[str] = None,
    plt_fig_axis: Optional[tuple[Figure, Axes]] = None,
    outlier_perc: float = 2,
    cmap: Any = None,
    alpha_overlay: float = 0.5,
    show_colorbar: Optional[bool] = None,
    title: Optional[str] = None,
    fig_size: Optional[tuple[float, float]] = None,
    use_pyplot: bool = True,
    *,
    kind: str = "auto",
    channels_last: Optional[bool] = None,
    feature_names: Optional[Sequence[str]] = None,
    max_features: Optional[int] = None,
    tokens: Optional[Sequence[str]] = None,
    fontsize: float = 12,
    delta: Any = None,
    scale: Optional[float] = None,
    ax: Optional[Axes] = None,
) -> tuple[Figure, Axes]:
    """Attributions of one example: an image heat map, bars per feature, or highlighted tokens.

    Heat maps and tokens are coloured by A / t clipped to [-1, 1]: t is Captum's scale (the
    magnitude below which (100 - ``outlier_perc``)% of the total |A| lies) or ``scale``. Give
    compared panels the same ``scale`` so that one colour means one value in all of them.

    The arguments up to ``use_pyplot`` are ``captum.attr.visualization.visualize_image_attr``'s, in
    its order, so a call to that function works unchanged; unlike Captum, a heat map gets a colour
    bar by default, and the figure is never shown here: display or save the returned ``fig``.

    Args:
        attributions: one example's attributions. Image: (H, W), (C, H, W) or (H, W, C), channels
            summed as Captum; tabular: (n,); text: one per token. A leading batch axis of 1 is dropped.
        inputs: the example itself: the image (needed by every ``method`` but "heat_map"; integers
            read as 0..255, floats outside [0, 1] min-max rescaled) or the n feature values.
        method: for images, "heat_map", "blended_heat_map" (over the image in grey),
            "original_image", "masked_image" or "alpha_scaling", as Captum.
        sign: "all", "positive", "negative" or "absolute_value" (default: "absolute_value" for
            images, as Captum, "all" otherwise).
        plt_fig_axis: Captum's ``(figure, axes)`` to draw on (same as ``ax``).
        outlier_perc: the percentage of the total |attribution| drawn at full colour (clipped).
        cmap: the heat map's colour map (default: red-white-green for "all", as Captum).
        alpha_overlay: the heat map's opacity over the image ("blended_heat_map").
        show_colorbar: a colour bar under the image, its ticks in attribution units and its label
            saying what each sign means (text: the colour key line). None (default): for heat maps
            and text; False: none, as Captum's default.
        title: the axes' title; the completeness ``delta`` is added below it.
        fig_size: the figure's size in inches (default (6, 6) for images, as Captum).
        use_pyplot: False makes a ``matplotlib.figure.Figure`` that pyplot does not know about.
        kind: "auto" (text when ``tokens`` are given, tabular for ``feature_names`` or 1-D
            attributions, image otherwise), "image", "tabular" or "text".
        channels_last: whether a 3-D image is (H, W, C); None guesses from the shape.
        feature_names: tabular: the name of each feature.
        max_features: tabular: keep the ``max_features`` largest |attribution| only.
        tokens: text: the tokens, drawn on boxes coloured as ``attributions_to_html``, with a
            colour key on the last line.
        fontsize: text: the tokens' font size in points.
        delta: the completeness error sum(attr) - (F(x) - F(x')) of this example, for the title.
        scale: the |attribution| drawn at full colour instead of Captum's t (images and text).
        ax: an existing axes to draw on.

    Returns:
        ``(fig, ax)``: the figure (``plt_fig_axis``' when given) and the axes drawn on.

    >>> fig, ax = plot_attributions(attr[0], images[0], method="blended_heat_map", sign="all", delta=delta[0])
    >>> fig, ax = plot_attributions(attr_hwc, image_hwc, "blended_heat_map", "all", None, 2, None, 0.5, True)
    """
    _check_choice(kind, "kind", KINDS)
    _check_outlier_perc(outlier_perc)
    _check_scale(scale)
    if kind == "auto":
        if tokens is not None:
            kind = "text"
        elif feature_names is not None or squeeze_leading(as_array(attributions, "attributions")).ndim == 1:
            kind = "tabular"
        else:
            kind = "image"
    sign = ("absolute_value" if kind == "image" else "all") if sign is None else sign
    _check_choice(sign, "sign", SIGNS)
    given_fig = None
    if plt_fig_axis is not None:
        given_fig, ax = _fig_axis(plt_fig_axis, ax)
    created = ax is None
    if kind == "text":
        if tokens is None:
            raise ValueError("tokens: kind='text' needs the tokens; got None.")
        attr = _one_row(attributions, "attributions")
        check_length(attr, "attributions", len(tokens), "token")
        fig, ax = _new_axes(ax, fig_size or (8, 1), use_pyplot)
        weights, t = _signed_weights(attr, sign, outlier_perc, scale)
        legend = None if show_colorbar is False else _legend_entries(sign, t)
        n_lines = _plot_text(ax, tokens, weights, fontsize, legend)
        if created and fig_size is None:
            # grow the figure we made to the wrapped text: lines of 2 x fontsize points, room for a title
            height = n_lines * 2.0 * fontsize / 72 + 0.8
            fig.set_size_inches(fig.get_figwidth(), height)
            ax.set_position((0.02, 0.1 / height, 0.96, 1 - 0.7 / height))
    elif kind == "tabular":
        n = squeeze_leading(as_array(attributions, "attributions")).size
        shown = n if max_features is None else min(n, max_features)
        fig, ax = _new_axes(ax, fig_size or (6, 0.8 + 0.3 * shown), use_pyplot)
        _plot_tabular(ax, attributions, inputs, sign, feature_names, max_features)
    else:
        fig, ax = _new_axes(ax, fig_size or (6, 6), use_pyplot)
        _plot_image(
            ax,
            attributions,
            inputs,
            method,
            sign,
            outlier_perc,
            cmap,
            alpha_overlay,
            channels_last,
            show_colorbar,
            scale,
        )
    full_title = _title(title, delta)
    if full_title:
        ax.set_title(full_title)
    if created and kind != "text":  # the text layout placed its axes itself
        fig.tight_layout()
    return (fig if given_fig is None else given_fig), ax


# ---------------------------------------------------------------- data attribution


def _example(dataset: Any, index: int) -> tuple[Any, Any]:
    """(input, label or None) of one training example from a tensor/array or a dataset of tuples."""
    item = dataset[index]
    if isinstance(item, (tuple, list)):
        return item[0], item[-1]
    return item, None


def _label_text(label: Any) -> str:
    if isinstance(label, np.generic) or (hasattr(label, "ndim") and label.ndim == 0):
        label = label.item()
    return f"{label:g}" if isinstance(label, float) else str(label)


def _select_influential(scores: Any, indices: Any, k: Any, n_train: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training indices of the k highest and k lowest scores, and those scores as a (2, k) array."""
    s = squeeze_leading(as_array(scores, "scores"))
    if s.ndim != 1:
        raise ValueError(f"scores: expected the scores of one test example, shape (n,); got shape {s.shape}.")
    if indices is None:
        check_length(s, "scores", n_train, "training example")
        idx = np.arange(n_train)
    else:
        idx = squeeze_leading(as_array(indices, "indices", keep_dtype=True))
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices: expected a 1-D integer array of training indices; got {idx.dtype} {idx.shape}.")
        check_length(idx, "indices", s.size, "score")
        if idx.size and (idx.min() < 0 or idx.max() >= n_train):
            raise ValueError(f"indices: expected values in [0, {n_train}); got range [{idx.min()}, {idx.max()}].")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or 2 * k > s.size:
        raise ValueError(
            f"k: expected an int in [1, {s.size // 2}] (k proponents and k opponents of {s.size}); got {k!r}."
        )
    pro = np.argsort(-s, kind="stable")[:k]
    opp = np.argsort(s, kind="stable")[:k]
    return idx[pro], idx[opp], np.stack([s[pro], s[opp]])


def plot_influential(
    test_example: Any,
    train_examples: Any,
    scores: Any,
    indices: Any = None,
    k: int = 3,
    *,
    labels: Any = None,
    mislabeled: Any = None,
    true_labels: Any = None,
    test_label: Any = None,
    method: Optional[str] = None,
    feature_names: Optional[Sequence[str]] = None,
    channels_last: Optional[bool] = None,
    cmap: str = "gray",
    fig_size: Optional[tuple[float, float]] = None,
) -> tuple[Figure, Any]:
    """A test example with its ``k`` proponents (highest scores) and ``k`` opponents (lowest).

    Images give a grid (2, k + 1): the test example, then proponents on the top row and opponents
    below, the cell under the test example holding the key; 1-D examples give a table with one row
    per example.

    Args:
        test_example: the test example: an image ((H, W), (C, H, W), (H, W, C)) or (n_features,).
        train_examples: a tensor/array (n_train, ...) or a dataset of ``(input, ..., label)``
            tuples (labels then come from it unless ``labels`` is given).
        scores: the test example's row of ``influence(...)``, one score per training example, or
            the scores of the training examples listed in ``indices``.
        indices: training indices of ``scores`` (e.g. both ``influence(k=...)`` results concatenated).
        k: how many proponents and opponents to show.
        labels: (n_train,) the labels trained on.
        mislabeled: (n_train,) booleans: training examples whose label is wrong, framed in red.
        true_labels: (n_train,) the correct labels: a mislabelled example then reads
            "given 6, true 4" instead of "label 6".
        test_label: the test example's label.
        method: the attribution method, named in the figure's title.
        feature_names: 1-D examples: the column names.
        channels_last: whether 3-D images are (H, W, C); None guesses from the shape.
        cmap: the images' colour map.
        fig_size: the figure's size in inches.

    Returns:
        ``(fig, axes)``: a (2, k + 1) array of axes for images, the table's axes for 1-D examples.
    """
    n_train = len(train_examples)
    pro, opp, chosen_scores = _select_influential(scores, indices, k, n_train)
    for name, given in (("labels", labels), ("true_labels", true_labels)):
        if given is not None and len(given) != n_train:
            raise ValueError(f"{name}: expected one label per training example ({n_train}); got {len(given)}.")
    mis = None if mislabeled is None else as_mask(mislabeled, "mislabeled", ndim=1)
    if mis is not None:
        check_length(mis, "mislabeled", n_train, "training example")
    rows = []  # (title, input, label, true label of a mislabelled example, score, is_mislabeled)
    for kind, chosen, row_scores in (("proponent", pro, chosen_scores[0]), ("opponent", opp, chosen_scores[1])):
        for rank, (i, sc) in enumerate(zip(chosen, row_scores), start=1):
            x, item_label = _example(train_examples, int(i))
            label = labels[int(i)] if labels is not None else item_label
            is_mis = bool(mis[i]) if mis is not None else False
            true = true_labels[int(i)] if is_mis and true_labels is not None else None
            rows.append((f"{kind} {rank}: #{i}", x, label, true, float(sc), is_mis))
    test = squeeze_leading(as_array(test_example, "test_example", keep_dtype=True))
    if test.ndim == 1:
        return _influential_table(test, test_label, rows, feature_names, fig_size, method)
    fig, axes = _influential_images(test, test_label, rows, k, channels_last, cmap, fig_size, mis is not None)
    if method is not None:
        fig.suptitle(f"{method}: proponents (top) and opponents (bottom) of the test example", fontsize=11)
    return fig, axes


def _influential_images(test, test_label, rows, k, channels_last, cmap, fig_size, marks_mislabeled):
    images = [_as_image(test, "test_example", channels_last)]
    images += [_as_image(x, "train_examples", channels_last) for _, x, *_ in rows]
    if any(im.shape != images[0].shape for im in images):
        raise ValueError(f"train_examples: expected images shaped like test_example {images[0].shape}.")
    images = [_display(im, "train_examples") for im in _unit_range(images)]
    fig, axes = plt.subplots(2, k + 1, figsize=fig_size or (1.75 * (k + 1), 4.6), squeeze=False, layout="constrained")
    shown = {"cmap": cmap, "vmin": 0, "vmax": 1}
    axes[0, 0].imshow(images[0], **shown)
    axes[0, 0].set_title("test" + ("" if test_label is None else f"\nlabel {_label_text(test_label)}"), fontsize=9)
    _plain_image_axes(axes[0, 0])
    key = ["score: how much the", "training example raises", "(+) or lowers (-) the", "test prediction"]
    if marks_mislabeled:
        key += ["", "red frame: trained on", "a wrong label"]
    axes[1, 0].set_axis_off()
    axes[1, 0].text(0.0, 0.5, "\n".join(key), fontsize=7.5, va="center", ha="left", transform=axes[1, 0].transAxes)
    for j, ((title, _, label, true, score, is_mis), image) in enumerate(zip(rows, images[1:])):
        ax = axes[j // k, 1 + j % k]
        ax.imshow(image, **shown)
        text = f"{title}\nscore {score:+.3g}"
        if label is not None:
            text += (
                f"\nlabel {_label_text(label)}"
                if true is None
                else f"\ngiven {_label_text(label)}, true {_label_text(true)}"
            )
        if is_mis and true is None:
            text += "\nmislabelled"
        if is_mis:
            for spine in ax.spines.values():
                spine.set_edgecolor(_MISLABELED)
                spine.set_linewidth(3)
        ax.set_title(text, fontsize=8.5, color=_MISLABELED if is_mis else "black")
        _plain_image_axes(ax)
    axes[0, 1].set_ylabel("proponents")
    axes[1, 1].set_ylabel("opponents")
    return fig, axes


def _influential_table(test, test_label, rows, feature_names, fig_size, method):
    n = test.size
    names = [f"x{i}" for i in range(n)] if feature_names is None else [str(f) for f in feature_names]
    if len(names) != n:
        raise ValueError(f"feature_names: expected {n} names, one per feature; got {len(names)}.")
    test_cells = [f"{v:.3g}" for v in test.astype(np.float64)]
    cells = [["test", *test_cells, "" if test_label is None else _label_text(test_label), ""]]
    for title, x, label, true, score, is_mis in rows:
        values = _one_row(x, "train_examples")
        check_length(values, "train_examples", n, "feature of test_example")
        name = title + (" (mislabelled)" if is_mis else "")
        label_cell = (
            "" if label is None else _label_text(label) + ("" if true is None else f" (true {_label_text(true)})")
        )
        cells.append([name, *(f"{v:.3g}" for v in values), label_cell, f"{score:+.3g}"])
    fig, ax = plt.subplots(figsize=fig_size or (3.0 + 0.8 * (n + 2), 0.8 + 0.3 * len(cells)))
    ax.set_axis_off()
    columns = ["example", *names, "label", "score"]
    table = ax.table(cellText=cells, colLabels=columns, loc="center")
    table.auto_set_column_width(list(range(len(columns))))
    for r, (*_, is_mis) in enumerate(rows, start=2):  # row 0 holds the column names, row 1 the test example
        if is_mis:
            for c in range(len(columns)):
                table[r, c].set_facecolor("#f7c6c6")
    ax.set_title(("" if method is None else f"{method}: ") + "test example, proponents and opponents")
    return fig, ax


def _check_axes_count(ax: Any, count: int, why: str) -> list[Axes]:
    given = [ax] if isinstance(ax, Axes) else list(np.ravel(np.asarray(ax, dtype=object)))
    if len(given) != count or not all(isinstance(a, Axes) for a in given):
        raise ValueError(f"ax: expected {count} matplotlib Axes ({why}); got {ax!r}.")
    return given


def _log_counts_needed(counts: np.ndarray) -> bool:
    """Whether one bin dwarfs the others: the largest count over 10 times the median nonzero count."""
    nonzero = counts[counts > 0]
    return nonzero.size > 1 and counts.max() > 10 * np.median(nonzero)


def plot_self_influence(
    self_influence: Any,
    is_mislabeled: Any = None,
    *,
    method: Optional[str] = None,
    flag_fraction: float = 0.05,
    bins: int = 30,
    log_counts: Union[bool, str] = "auto",
    ax: Any = None,
    fig_size: Optional[tuple[float, float]] = None,
) -> tuple[Figure, Any]:
    """Histogram of self-influence with the top ``flag_fraction`` flagged for inspection.

    With ``is_mislabeled`` the histogram splits clean and mislabelled examples and a second panel
    draws the detection curve: the fraction of mislabelled examples found against the fraction of
    the training set inspected in decreasing self-influence, with its ROC AUC, beside a random
    order and a perfect one; its x axis stops where the curve has found them all (or a little
    past the flagged fraction), so the part that matters fills the panel.

    Args:
        self_influence: (n,) one score per training example (``self_influence()``); higher means
            more suspicious. For regression use its absolute value.
        is_mislabeled: (n,) booleans, the known mislabelled examples (for a benchmark).
        method: the method that gave the scores ("TracInCP", "TRAK" ...), named in the titles.
        flag_fraction: the fraction of the training set flagged, from the top.
        bins: the number of histogram bins.
        log_counts: a log count axis: True, False, or "auto" (when one bin holds over 10 times
            the median count of the nonzero bins, which would hide the others).
        ax: one axes (without ``is_mislabeled``) or two to draw on.
        fig_size: the figure's size in inches.

    Returns:
        ``(fig, ax)``, or ``(fig, [hist_ax, curve_ax])`` with ``is_mislabeled``.
    """
    si = as_array(self_influence, "self_influence", ndim=1)
    if si.size < 2:
        raise ValueError(f"self_influence: expected at least 2 values; got {si.size}.")
    if isinstance(flag_fraction, bool) or not isinstance(flag_fraction, (int, float)) or not 0 < flag_fraction <= 1:
        raise ValueError(f"flag_fraction: expected a number in (0, 1]; got {flag_fraction!r}.")
    if log_counts not in (True, False, "auto"):
        raise ValueError(f"log_counts: expected True, False or 'auto'; got {log_counts!r}.")
    mis = None if is_mislabeled is None else as_mask(is_mislabeled, "is_mislabeled", ndim=1)
    panels = 1 if mis is None else 2
    if ax is None:
        fig, created = plt.subplots(1, panels, figsize=fig_size or (5.5 * panels, 4), squeeze=False)
        axes = list(created[0])
    else:
        axes = _check_axes_count(ax, panels, "a histogram" + ("" if mis is None else " and a detection curve"))
        fig = _figure(axes[0])
    order = np.argsort(-si, kind="stable")
    n = si.size
    n_flag = max(1, int(round(flag_fraction * n)))
    threshold = si[order[n_flag - 1]]
    edges = np.histogram_bin_edges(si, bins=bins)
    hist_ax = axes[0]
    prefix = "" if method is None else f"{method} "
    title = f"{prefix}self-influence of {n} training examples"
    title = title[0].upper() + title[1:]
    if mis is None:
        hist_ax.hist(si, bins=edges, color="#1f77b4", label="training examples")
    else:
        auc = mislabel_detection_auc(si, mis)  # checks lengths and that both classes occur
        hist_ax.hist(
            [si[~mis], si[mis]],
            bins=edges,
            stacked=True,
            color=["#1f77b4", _MISLABELED],
            label=["clean", "mislabelled"],
        )
        title += f"\n{int(mis[order[:n_flag]].sum())} of the {n_flag} flagged are mislabelled ({int(mis.sum())} in all)"
    hist_ax.axvline(threshold, color="black", linestyle="--", label=f"top {n_flag} flagged (>= {threshold:.3g})")
    hist_ax.set_xlabel("self-influence")
    if log_counts is True or (log_counts == "auto" and _log_counts_needed(np.histogram(si, bins=edges)[0])):
        hist_ax.set_yscale("log")
        hist_ax.set_ylabel("count (log scale)")
    else:
        hist_ax.set_ylabel("count")
    hist_ax.set_title(title)
    hist_ax.legend()
    if mis is None:
        return fig, hist_ax
    curve_ax = axes[1]
    inspected = np.arange(n + 1) / n
    found = np.r_[0, np.cumsum(mis[order])] / mis.sum()
    all_found = inspected[np.argmax(found >= 1)]
    x_max = min(1.0, 1.3 * max(all_found, 2 * n_flag / n))
    curve_ax.plot(inspected, found, color=_MISLABELED, label=f"by {prefix}self-influence (AUC {auc:.3f})")
    curve_ax.plot(
        inspected, np.minimum(inspected * n / mis.sum(), 1), color="gray", linestyle="-.", label="perfect order"
    )
    curve_ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="random order")
    curve_ax.axvline(n_flag / n, color="black", linestyle="--", label=f"flagged ({n_flag / n:.0%})")
    curve_ax.set_xlim(0, x_max)
    curve_ax.set_ylim(0, 1.02)
    curve_ax.set_xlabel("fraction of training set inspected" + ("" if x_max == 1 else f" (first {x_max:.0%} shown)"))
    curve_ax.set_ylabel("fraction of mislabelled examples found")
    curve_ax.set_title("Mislabel detection" + ("" if method is None else f" by {method}"))
    curve_ax.legend(loc="lower right", fontsize=8)
    if ax is None:
        fig.tight_layout()
    return fig, axes


def plot_completeness(
    n_steps: Any,
    deltas: Any,
    *,
    output_change: Any = None,
    labels: Optional[Sequence[str]] = None,
    tolerance: Union[float, str, None] = "auto",
    method: Optional[str] = None,
    legend: bool = True,
    ax: Optional[Axes] = None,
    fig_size: tuple[float, float] = (6.5, 4),
) -> tuple[Figure, Axes]:
    """Completeness error against ``n_steps``, one line per example, log scales.

    With ``output_change`` the relative error |delta| / |F(x) - F(x')| is drawn, the quantity that
    ``n_steps="auto"`` and ``check_completeness`` hold to a tolerance, with that tolerance as a
    line; without it the absolute |delta| = |sum(attr) - (F(x) - F(x'))|. An exact zero cannot sit
    on a log axis: it is drawn at a floor one decade below the smallest nonzero value, with its own
    marker. The legend sits outside the axes, to the right.

    Args:
        n_steps: the step counts tried, positive integers.
        deltas: (len(n_steps),) for one example or (len(n_steps), n_examples): the convergence
            deltas sum(attr) - (F(x) - F(x')) at each step count; signs are dropped.
        output_change: (n_examples,) F(x) - F(x') (``CompletenessReport.output_change``).
        labels: a name per example, for the legend.
        tolerance: a horizontal line at this value; "auto" draws 1e-3 (``n_steps="auto"``'s
            default target) for relative errors and nothing for absolute ones; None draws nothing.
        method: the attribution method, named in the title.
        legend: draw the legend (False to share one legend between panels).
        ax: an existing axes to draw on.
        fig_size: the figure's size in inches, when one is made.

    Returns:
        ``(fig, ax)``.
    """
    steps = as_array(n_steps, "n_steps", ndim=1)
    if steps.size == 0 or (steps < 1).any() or (steps != np.round(steps)).any():
        raise ValueError(f"n_steps: expected positive integers; got {steps.tolist()}.")
    d = np.abs(as_array(deltas, "deltas", ndim=(1, 2)))
    if d.ndim == 1:
        d = d[:, None]
    if d.shape[0] != steps.size:
        raise ValueError(
            f"deltas: expected shape (len(n_steps)={steps.size}, n_examples), one row per n_steps value; got {d.shape}."
        )
    n_examples = d.shape[1]
    if labels is not None and len(labels) != n_examples:
        raise ValueError(f"labels: expected {n_examples} labels, one per example; got {len(labels)}.")
    relative = output_change is not None
    if relative:
        change = np.abs(as_array(output_change, "output_change", ndim=(0, 1))).reshape(-1)
        check_length(change, "output_change", n_examples, "example")
        if (change == 0).any():
            raise ValueError(
                f"output_change: examples {np.flatnonzero(change == 0).tolist()} have F(x) = F(x'); "
                "their relative error is undefined: plot absolute deltas (output_change=None)."
            )
        d = d / change
    if isinstance(tolerance, str):
        _check_choice(tolerance, "tolerance", ("auto",))
        tolerance = 1e-3 if relative else None
    created = ax is None
    fig, ax = _new_axes(ax, fig_size)
    positive = d[d > 0]
    floor = positive.min() / 10 if positive.size else 1e-16
    zero = d == 0
    shown = np.where(zero, floor, d)
    for j in range(n_examples):
        ax.plot(steps, shown[:, j], marker="o", markersize=3, label=None if labels is None else str(labels[j]))
    name = "relative error" if relative else "|delta|"
    if zero.any():
        rows, cols = np.nonzero(zero)
        ax.scatter(
            steps[rows], np.full(rows.size, floor), marker="v", color="black", zorder=3, label=f"{name} = 0 (at floor)"
        )
    if tolerance is not None:
        tol = float(as_array(tolerance, "tolerance", ndim=0))
        ax.axhline(tol, color="black", linestyle="--", linewidth=1, label=f"tolerance {tol:g}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [f"{int(v)}" for v in steps])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("n_steps")
    if relative:
        ax.set_ylabel("|sum(attr) - (F(x) - F(x'))| / |F(x) - F(x')|")
        what = "relative completeness error"
    else:
        ax.set_ylabel("|sum(attr) - (F(x) - F(x'))|")
        what = "completeness error |delta|"
    ax.set_title(what[0].upper() + what[1:] if method is None else f"{method}: {what}")
    if legend and (labels is not None or zero.any() or tolerance is not None):
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    if created:
        fig.tight_layout()
    return fig, ax


def plot_lds(
    predicted: Any,
    actual: Any,
    *,
    title: Optional[str] = None,
    method: Optional[str] = None,
    ax: Optional[Axes] = None,
    fig_size: tuple[float, float] = (5, 5),
) -> tuple[Figure, Axes]:
    """Predicted against actual outputs of models trained on random subsets, for one test example,
    with their Spearman correlation (the per-example term of ``metrics.lds``).

    Args:
        predicted: (m,) ``predicted[j]`` = the sum of the scores of the training examples in
            subset j (``subset_masks.float() @ scores[t]``).
        actual: (m,) the output of the model trained on subset j.
        title: the title's first line; the Spearman correlation follows.
        method: the attribution method, named first in the title.
        ax: an existing axes to draw on.
        fig_size: the figure's size in inches, when one is made.

    Returns:
        ``(fig, ax)``.
    """
    p = as_array(predicted, "predicted", ndim=1)
    a = as_array(actual, "actual", ndim=1)
    check_length(a, "actual", p.size, "predicted output")
    if p.size < 2:
        raise ValueError(f"predicted: expected at least 2 subsets; got {p.size}.")
    created = ax is None
    fig, ax = _new_axes(ax, fig_size)
    ax.scatter(p, a, s=14, alpha=0.8)
    constant = [name for name, v in (("predicted", p), ("actual", a)) if np.ptp(v) == 0]
    rho = (
        f"Spearman ρ undefined ({' and '.join(constant)} constant)"
        if constant
        else f"Spearman ρ = {spearman(p, a):.3f}"
    )
    head = ", ".join(part for part in (method, title) if part)
    ax.set_title(f"{head}\n{rho}" if head else rho)
    ax.set_xlabel("predicted output (sum of scores over the subset)")
    ax.set_ylabel("actual output (model trained on the subset)")
    if created:
        fig.tight_layout()
    return fig, ax
