import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from captum.attr._utils.visualization import _normalize_attr, visualize_image_attr  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import captum_influence as ci  # noqa: E402
from captum_influence import visualization as vis  # noqa: E402


@pytest.fixture(autouse=True)
def _no_show_and_close(monkeypatch):
    def show(*args, **kwargs):
        raise AssertionError("plt.show() must not be called")

    monkeypatch.setattr(plt, "show", show)
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.images[:200], d.target[:200]


def _render(fig, tmp_path, name="fig"):
    """Save as PNG and check that it holds a drawing: enough pixels that are not the background."""
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    assert path.stat().st_size > 0
    pixels = plt.imread(path)[:, :, :3]
    drawn = (np.abs(pixels - pixels[0, 0]).sum(axis=2) > 0.05).mean()
    assert drawn > 0.01, f"{name}: only {drawn:.2%} of the pixels are drawn"
    plt.close(fig)


def _number(text, label):
    return float(re.search(label + r" = ([-+0-9.e]+)", text).group(1))


def test_exported_at_top_level():
    assert ci.visualization.plot_lds is vis.plot_lds


@pytest.mark.parametrize("sign", ["all", "positive", "negative", "absolute_value"])
@pytest.mark.parametrize("outlier_perc", [0, 2, 20])
def test_image_heat_map_matches_captum_normalisation(sign, outlier_perc):
    attr = torch.randn(3, 8, 8)  # channels first, as a torch model gives it
    fig, ax = vis.plot_attributions(attr, sign=sign, outlier_perc=outlier_perc)
    expected = _normalize_attr(attr.double().permute(1, 2, 0).sum(2).numpy(), sign, outlier_perc)
    assert len(ax.images) == 1
    np.testing.assert_allclose(ax.images[0].get_array(), expected, rtol=1e-12)
    assert ax.images[0].get_clim() == ((-1.0, 1.0) if sign == "all" else (0.0, 1.0))


@pytest.mark.parametrize("method", vis.METHODS)
def test_image_methods_render_with_delta_in_title(method, digits, tmp_path):
    images, _ = digits
    attr = torch.randn(1, 1, 8, 8)  # a batch of one, as attribute() returns it
    signs = ["positive", "absolute_value"] if method in ("masked_image", "alpha_scaling") else vis.SIGNS
    for sign in signs:
        fig, ax = vis.plot_attributions(
            attr, images[0], method=method, sign=sign, title="digit 0", delta=torch.tensor([-3.2e-5])
        )
        assert ax.get_title() == "digit 0\ncompleteness delta = -3.20e-05"
        assert len(ax.images) == (2 if method == "blended_heat_map" else 1)
        _render(fig, tmp_path, f"{method}_{sign}")


def test_masked_and_alpha_images_scale_the_image(digits):
    image = digits[0][3]
    attr = np.random.default_rng(0).standard_normal((8, 8))
    norm = _normalize_attr(attr, "absolute_value", 2)
    unit = image / image.max()  # digits are 0..16 here: min-max to [0, 1]
    assert image.min() == 0
    _, ax = vis.plot_attributions(attr, image, method="masked_image")
    np.testing.assert_allclose(ax.images[0].get_array(), np.repeat((unit * norm)[:, :, None], 3, axis=2))
    _, ax = vis.plot_attributions(attr, image, method="alpha_scaling")
    np.testing.assert_allclose(ax.images[0].get_array()[:, :, 3], norm)
    np.testing.assert_allclose(ax.images[0].get_array()[:, :, 0], unit)


def test_image_draws_into_given_axes_with_colorbar():
    fig, axes = plt.subplots(1, 2)
    out_fig, out_ax = vis.plot_attributions(torch.randn(8, 8, 3), ax=axes[1], show_colorbar=True, channels_last=True)
    assert out_fig is fig and out_ax is axes[1]
    assert len(fig.axes) == 3  # two given and the colorbar


def test_image_bad_input_names_the_argument():
    attr, image = np.ones((8, 8)), np.ones((8, 8))
    with pytest.raises(ValueError, match="method"):
        vis.plot_attributions(attr, image, method="heatmap")
    with pytest.raises(ValueError, match="sign"):
        vis.plot_attributions(attr, image, sign="both")
    with pytest.raises(ValueError, match="sign: 'all'"):
        vis.plot_attributions(attr, image, method="masked_image", sign="all")
    with pytest.raises(ValueError, match="inputs: method='blended_heat_map' needs"):
        vis.plot_attributions(attr, method="blended_heat_map")
    with pytest.raises(ValueError, match="inputs: image of height and width"):
        vis.plot_attributions(attr, np.ones((7, 8)), method="blended_heat_map")
    with pytest.raises(ValueError, match="outlier_perc"):
        vis.plot_attributions(attr, outlier_perc=100)
    with pytest.raises(ValueError, match="channels_last"):
        vis.plot_attributions(np.ones((3, 8, 3)))
    with pytest.raises(ValueError, match="kind"):
        vis.plot_attributions(attr, kind="audio")
    with pytest.raises(ValueError, match="attributions: .*NaN"):
        vis.plot_attributions(np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="delta: expected one"):
        vis.plot_attributions(attr, delta=[1.0, 2.0])


def _hwc_pair(dtype):
    """Attributions and an image in Captum's (H, W, C) layout; the image in [0, 1] or 0..255."""
    rng = np.random.default_rng(1)
    attr = rng.standard_normal((8, 8, 3))
    image = rng.uniform(size=(8, 8, 3))
    return attr, (image if dtype == "float" else np.round(image * 255).astype(np.uint8))


def _colormap_samples(image):
    return image.get_cmap()(np.linspace(0, 1, 11))


@pytest.mark.parametrize("dtype", ["float", "uint8"])
@pytest.mark.parametrize("sign", vis.SIGNS)
@pytest.mark.parametrize("method", vis.METHODS)
def test_captum_call_form_draws_what_captum_draws(method, sign, dtype):
    attr, image = _hwc_pair(dtype)
    # visualize_image_attr's positional order: (attr, original_image, method, sign, plt_fig_axis,
    # outlier_perc, cmap, alpha_overlay, show_colorbar, title, fig_size, use_pyplot)
    args = (attr, image, method, sign, None, 5, None, 0.4, True, "swapped in", (4, 3), False)
    try:
        theirs_fig, theirs = visualize_image_attr(*args)
    except AssertionError:  # Captum refuses with an assert; ours with a ValueError naming the argument
        with pytest.raises(ValueError, match="^sign: 'all' cannot be shown"):
            vis.plot_attributions(*args)
        return
    fig, ax = vis.plot_attributions(*args)
    assert isinstance(fig, Figure) and ax.figure is fig
    np.testing.assert_array_equal(fig.get_size_inches(), theirs_fig.get_size_inches())
    assert ax.get_title() == theirs.get_title()
    assert len(ax.images) == len(theirs.images)
    # the colour bar: present under a heat map, an empty hidden axes otherwise, as Captum
    assert [im.colorbar is not None for im in ax.images] == [im.colorbar is not None for im in theirs.images]
    assert [a.axison for a in fig.axes] == [a.axison for a in theirs_fig.axes]
    pictures = zip(ax.images, theirs.images)
    if method in ("heat_map", "blended_heat_map"):
        *pictures, (heat, their_heat) = pictures
        np.testing.assert_allclose(heat.get_array(), their_heat.get_array(), rtol=0, atol=1e-6)
        assert heat.get_clim() == their_heat.get_clim()
        assert heat.get_alpha() == their_heat.get_alpha()
        assert heat.get_cmap().name == their_heat.get_cmap().name
        np.testing.assert_array_equal(_colormap_samples(heat), _colormap_samples(their_heat))
    for ours, their in pictures:
        # Captum draws the image (and the masked image, the alpha channel) as 8-bit integers, we as
        # floats in [0, 1]: the same picture, but for Captum's truncations to 8 bits (two for a
        # masked float image: the image, then the product)
        levels = 2 if method == "masked_image" and dtype == "float" else 1
        np.testing.assert_allclose(np.asarray(ours.get_array()) * 255, their.get_array(), rtol=0, atol=levels + 1e-9)


def test_captum_call_form_defaults():
    attr, image = _hwc_pair("float")
    fig, ax = vis.plot_attributions(attr, image, use_pyplot=False)
    theirs_fig, theirs = visualize_image_attr(attr, image, use_pyplot=False)
    np.testing.assert_array_equal(fig.get_size_inches(), theirs_fig.get_size_inches())
    np.testing.assert_allclose(ax.images[-1].get_array(), theirs.images[-1].get_array(), rtol=0, atol=1e-6)
    assert ax.images[-1].get_cmap().name == theirs.images[-1].get_cmap().name == "Blues"
    # unlike Captum, a heat map gets its colour bar unless show_colorbar=False
    assert len(theirs_fig.axes) == 1 and len(fig.axes) == 2 and ax.images[-1].colorbar is not None
    fig, _ = vis.plot_attributions(attr, image, show_colorbar=False, use_pyplot=False)
    assert len(fig.axes) == 1


def _colorbar_ticks(image):
    bar = image.colorbar
    return [float(v) for v in bar.get_ticks()], [t.get_text() for t in bar.ax.get_xticklabels()]


@pytest.mark.parametrize("method", ["heat_map", "blended_heat_map"])
def test_heat_map_colour_bar_reads_in_attribution_units_with_the_signs_meaning(method, digits):
    attr = np.linspace(-2.0, 1.0, 64).reshape(8, 8)
    fig, ax = vis.plot_attributions(attr, digits[0][0], method=method, sign="all", outlier_perc=0)
    heat = ax.images[-1]
    assert heat.colorbar is not None
    ticks, labels = _colorbar_ticks(heat)
    t = np.abs(attr).max()  # outlier_perc=0: Captum's scale is the largest |attribution|
    assert ticks == [-1.0, 0.0, 1.0] and labels == [f"-{t:.2g}", "0", f"+{t:.2g}"]
    assert "lowers" in heat.colorbar.ax.get_xlabel() and "raises" in heat.colorbar.ax.get_xlabel()
    assert heat.colorbar.extend == "neither"  # nothing clipped
    _, ax = vis.plot_attributions(attr, sign="positive", outlier_perc=20)
    ticks, labels = _colorbar_ticks(ax.images[0])
    assert ticks == [0.0, 1.0] and ax.images[0].colorbar.extend == "max"  # the largest are clipped
    assert "positive" in ax.images[0].colorbar.ax.get_xlabel()


def test_panels_share_a_scale(digits):
    rng = np.random.default_rng(3)
    small, large = rng.standard_normal((8, 8)), 10 * rng.standard_normal((8, 8))
    scale = float(np.abs(large).max())
    fig, axes = plt.subplots(1, 2)
    for ax, attr in zip(axes, (small, large)):
        vis.plot_attributions(attr, sign="all", scale=scale, ax=ax)
    for ax, attr in zip(axes, (small, large)):
        np.testing.assert_allclose(ax.images[0].get_array(), attr / scale)  # one colour, one value
        assert _colorbar_ticks(ax.images[0])[1] == [f"-{scale:.2g}", "0", f"+{scale:.2g}"]
    # without a shared scale each panel fills its own colour range (Captum's per-image scaling)
    _, ax = vis.plot_attributions(small, sign="all", outlier_perc=0)
    assert np.abs(ax.images[0].get_array()).max() == pytest.approx(1.0)
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="^scale: expected a positive number"):
            vis.plot_attributions(small, scale=bad)


@pytest.mark.parametrize("method", [m for m in vis.METHODS if m != "heat_map"])
def test_captum_call_form_without_image_names_the_argument(method):
    attr = np.random.default_rng(0).standard_normal((8, 8, 3))
    with pytest.raises(ValueError):
        visualize_image_attr(attr, None, method, "positive", use_pyplot=False)
    with pytest.raises(ValueError, match=f"^inputs: method={method!r} needs the original image"):
        vis.plot_attributions(attr, None, method, "positive", use_pyplot=False)


def test_use_pyplot_false_leaves_pyplot_alone(tmp_path):
    attr, image = _hwc_pair("float")
    before = plt.get_fignums()
    figures = [
        vis.plot_attributions(attr, image, "blended_heat_map", "all", show_colorbar=True, use_pyplot=False)[0],
        vis.plot_attributions(attr, image, "original_image", show_colorbar=True, use_pyplot=False)[0],
        vis.plot_attributions(np.arange(4.0) - 1.5, use_pyplot=False)[0],
        vis.plot_attributions(np.arange(4.0) - 1.5, tokens=list("abcd"), use_pyplot=False)[0],
    ]
    assert plt.get_fignums() == before
    for i, fig in enumerate(figures):
        assert isinstance(fig, Figure)
        _render(fig, tmp_path, f"no_pyplot_{i}")
    assert plt.get_fignums() == before
    vis.plot_attributions(attr, image)
    assert len(plt.get_fignums()) == len(before) + 1


def test_plt_fig_axis_draws_on_the_given_axes():
    attr, image = _hwc_pair("float")
    fig, axes = plt.subplots(1, 2)
    out_fig, out_ax = vis.plot_attributions(attr, image, "masked_image", "positive", (fig, axes[1]), show_colorbar=True)
    assert out_fig is fig and out_ax is axes[1]
    assert len(fig.axes) == 3 and not fig.axes[2].axison  # the hidden colour-bar axes, as Captum
    subfigure = plt.figure().subfigures(1, 2)[0]
    sub_ax = subfigure.subplots()
    root = sub_ax.get_figure(root=True)
    assert vis.plot_attributions(attr, plt_fig_axis=(root, sub_ax))[0] is root
    with pytest.raises(ValueError, match="^plt_fig_axis: got both"):
        vis.plot_attributions(attr, plt_fig_axis=(fig, axes[0]), ax=axes[0])
    with pytest.raises(ValueError, match="^plt_fig_axis: the Axes is not on the given Figure"):
        vis.plot_attributions(attr, plt_fig_axis=(plt.figure(), axes[0]))
    with pytest.raises(TypeError, match="^plt_fig_axis: expected a"):
        vis.plot_attributions(attr, plt_fig_axis=axes[0])


def test_tabular_bars_with_feature_names(tmp_path):
    values = torch.tensor([[0.5, -1.0, 2.0, -0.25, 0.0]])
    names = ["age", "income", "height", "weight", "zip"]
    fig, ax = vis.plot_attributions(values, torch.arange(5.0), feature_names=names, delta=1e-3)
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 5
    np.testing.assert_allclose([b.get_width() for b in bars], values[0].numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{n} = {i:.3g}" for i, n in enumerate(names)]
    assert to_rgb(bars[1].get_facecolor()) == to_rgb(vis._NEGATIVE)
    assert to_rgb(bars[2].get_facecolor()) == to_rgb(vis._POSITIVE)
    assert ax.get_title() == "completeness delta = +1.00e-03"
    _render(fig, tmp_path)

    _, ax = vis.plot_attributions(values, feature_names=names, max_features=2, sign="absolute_value")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["height", "income"]
    np.testing.assert_allclose([b.get_width() for b in ax.patches], [2.0, 1.0])
    assert ax.get_xlabel() == "|attribution|"

    with pytest.raises(ValueError, match="feature_names: expected 5"):
        vis.plot_attributions(values, feature_names=names[:4])
    with pytest.raises(ValueError, match="inputs: expected one entry per attribution"):
        vis.plot_attributions(values, torch.ones(4), kind="tabular")


def test_text_tokens_highlighted_and_wrapped(tmp_path):
    tokens = ("this film was not $good$ at all <pad> " * 4).split()
    attr = torch.linspace(-1, 1, len(tokens))
    fig, ax = vis.plot_attributions(attr, tokens=tokens, title="review", sign="all", outlier_perc=0)
    boxes = [t for t in ax.texts if t.get_bbox_patch() is not None]
    key = boxes[len(tokens) :]
    boxes = boxes[: len(tokens)]
    assert [t.get_text() for t in boxes] == tokens  # "$good$" kept literally, not parsed as maths
    # the colour key on its own last line: the scale's ends (|attr| max with outlier_perc=0) and zero
    assert [t.get_text() for t in key] == ["-1 lowers the output", "0", "+1 raises it"]
    assert [to_rgb(t.get_bbox_patch().get_facecolor()) for t in key] == [
        to_rgb(boxes[0].get_bbox_patch().get_facecolor()),
        (1.0, 1.0, 1.0),
        to_rgb(boxes[-1].get_bbox_patch().get_facecolor()),
    ]
    last_line = min(t.get_transform().transform((0, 1))[1] for t in boxes)
    assert all(t.get_transform().transform((0, 1))[1] < last_line for t in key)
    colours = [to_rgb(t.get_bbox_patch().get_facecolor()) for t in boxes]
    assert colours[0][0] > colours[0][1]  # most negative: red
    assert colours[-1][1] > colours[-1][0]  # most positive: green
    lines = {t.get_transform().transform((0, 1))[1] for t in boxes}
    assert len(lines) > 1  # 32 tokens do not fit on one line of an 8-inch figure
    assert ax.get_title() == "review"
    _render(fig, tmp_path)
    _, plain = vis.plot_attributions(attr, tokens=tokens, show_colorbar=False)  # no colour key
    assert [t.get_text() for t in plain.texts] == tokens
    with pytest.raises(ValueError, match="attributions: expected one entry per token"):
        vis.plot_attributions(attr[:-1], tokens=tokens)
    with pytest.raises(ValueError, match="tokens"):
        vis.plot_attributions(attr, kind="text")


def test_attributions_to_html():
    tokens = ["good", "<pad>", "bad", "meh"]
    page = vis.attributions_to_html(tokens, torch.tensor([2.0, 0.0, -1.0, 0.5]), outlier_perc=0, delta=0.01)
    text, key = page.split('<div class="captum-influence-key"')
    assert text.count("<mark") == 4
    assert re.findall(r">([^<>]+)</mark>", key) == ["-2 lowers the output", "0", "+2 raises it"]
    assert vis.attributions_to_html(tokens, [1.0, 0, 0, 0], legend=False).count("<mark") == 4
    shared = vis.attributions_to_html(tokens, [1.0, 0, -1.0, 0], scale=4.0)  # 1.0 drawn as a quarter of full colour
    first = tuple(map(int, re.search(r"rgb\((\d+), (\d+), (\d+)\)", shared).groups()))
    assert first == tuple(round(255 * c) for c in vis._token_rgb(0.25)) and "+4 raises it" in shared
    assert "&lt;pad&gt;" in page and "<pad>" not in page
    assert "completeness delta = +1.00e-02" in page
    colours = [tuple(map(int, c)) for c in re.findall(r"rgb\((\d+), (\d+), (\d+)\)", page)]
    assert colours[0][1] > colours[0][0]  # positive: green
    assert colours[1] == (255, 255, 255)  # zero: white
    assert colours[2][0] > colours[2][1]  # negative: red
    assert sum(colours[3]) > sum(colours[0])  # smaller attribution: paler
    with pytest.raises(ValueError, match="attributions: expected one entry per token"):
        vis.attributions_to_html(tokens, [1.0, 2.0])


def test_influential_images_show_proponents_opponents_and_mislabelled(digits, tmp_path):
    images, labels = digits
    scores = torch.randn(len(images))
    k = 3
    pro = torch.topk(scores, k).indices.tolist()
    opp = torch.topk(-scores, k).indices.tolist()
    mislabeled = np.zeros(len(images), dtype=bool)
    mislabeled[pro[1]] = True
    fig, axes = vis.plot_influential(
        torch.tensor(images[0]), images, scores, k=k, labels=labels, mislabeled=mislabeled, test_label=labels[0]
    )
    assert axes.shape == (2, k + 1)
    assert sum(len(ax.images) for ax in axes.ravel()) == 1 + 2 * k
    assert axes[0, 0].get_title() == f"test\nlabel {labels[0]}"
    for row, chosen, kind in ((0, pro, "proponent"), (1, opp, "opponent")):
        for j, i in enumerate(chosen):
            title = axes[row, 1 + j].get_title()
            assert title.startswith(f"{kind} {j + 1}: #{i}\nscore {scores[i].item():+.3g}\nlabel {labels[i]}")
    assert axes[0, 2].get_title().endswith("mislabelled")
    assert to_rgb(axes[0, 2].title.get_color()) == to_rgb(vis._MISLABELED)
    assert sum(ax.get_title().endswith("mislabelled") for ax in axes.ravel()) == 1
    key = axes[1, 0].texts[0].get_text()  # the cell under the test example holds the key, not blank
    assert "score" in key and "red frame" in key
    _render(fig, tmp_path)


def test_influential_flipped_examples_show_given_and_true_labels_and_the_method(digits, tmp_path):
    images, true = digits
    given = true.copy()
    scores = np.linspace(1.0, -1.0, len(images))  # proponents 0, 1; opponents 199, 198
    flipped = np.zeros(len(images), dtype=bool)
    flipped[[1, 199]] = True
    given[flipped] = (true[flipped] + 3) % 10
    fig, axes = vis.plot_influential(
        images[5], images, scores, k=2, labels=given, true_labels=true, mislabeled=flipped, method="TracInCP"
    )
    assert fig.get_suptitle().startswith("TracInCP: proponents")
    assert axes[0, 2].get_title().endswith(f"given {given[1]}, true {true[1]}")
    assert axes[1, 1].get_title().endswith(f"given {given[199]}, true {true[199]}")
    assert axes[0, 1].get_title().endswith(f"label {given[0]}")  # a clean example keeps its one label
    assert [to_rgb(axes[0, 2].spines["top"].get_edgecolor()), axes[0, 2].spines["top"].get_linewidth()] == [
        to_rgb(vis._MISLABELED),
        3,
    ]
    _render(fig, tmp_path)
    # every cell is used: images in all but the key's cell, which holds text
    assert sum(len(ax.images) > 0 for ax in axes.ravel()) == axes.size - 1 and axes[1, 0].texts
    _, ax = vis.plot_influential(
        images[5].ravel(),
        images.reshape(len(images), -1),
        scores,
        k=1,
        labels=given,
        true_labels=true,
        mislabeled=flipped,
    )
    cells = ax.tables[0].get_celld()
    assert cells[3, 65].get_text().get_text() == f"{given[199]} (true {true[199]})"
    _, ax = vis.plot_influential(images[5].ravel(), images.reshape(len(images), -1), scores, k=1, method="TRAK")
    assert ax.get_title() == "TRAK: test example, proponents and opponents" and not ax.figure.get_suptitle()
    with pytest.raises(ValueError, match="^true_labels: expected one label per training example"):
        vis.plot_influential(images[0], images, scores, true_labels=true[:3])


def test_influential_from_top_k_results_and_a_dataset(digits):
    images, labels = digits
    data = TensorDataset(torch.tensor(images), torch.tensor(labels))
    # the rows of influence(k=2, proponents=True) and (proponents=False), concatenated
    indices = torch.tensor([17, 4, 90, 33])
    scores = torch.tensor([5.0, 3.0, -4.0, -1.0])
    _, axes = vis.plot_influential(images[0], data, scores, indices, k=2)
    titles = [axes[r, c].get_title().split("\n") for r in (0, 1) for c in (1, 2)]
    assert [t[0] for t in titles] == ["proponent 1: #17", "proponent 2: #4", "opponent 1: #90", "opponent 2: #33"]
    assert [t[2] for t in titles] == [f"label {labels[i]}" for i in (17, 4, 90, 33)]  # from the dataset


def test_influential_tabular_rows(tmp_path):
    rng = np.random.default_rng(0)
    train, scores = rng.standard_normal((30, 4)), rng.standard_normal(30)
    mislabeled = np.zeros(30, dtype=bool)
    mislabeled[np.argmin(scores)] = True
    fig, ax = vis.plot_influential(
        train[0], train, scores, k=2, labels=np.arange(30) % 3, mislabeled=mislabeled, feature_names=list("abcd")
    )
    cells = ax.tables[0].get_celld()
    n_rows = 1 + max(r for r, _ in cells)
    assert n_rows == 1 + 1 + 2 * 2  # header, test, 2 proponents, 2 opponents
    assert [cells[0, c].get_text().get_text() for c in range(7)] == ["example", "a", "b", "c", "d", "label", "score"]
    order = list(np.argsort(-scores)[:2]) + list(np.argsort(scores)[:2])
    assert [float(cells[r, 6].get_text().get_text()) for r in range(2, 6)] == pytest.approx(scores[order], rel=1e-2)
    assert cells[4, 0].get_text().get_text() == f"opponent 1: #{order[2]} (mislabelled)"
    _render(fig, tmp_path)


def test_influential_bad_input_names_the_argument(digits):
    images, labels = digits
    scores = np.zeros(len(images))
    with pytest.raises(ValueError, match="k: expected an int in"):
        vis.plot_influential(images[0], images, scores, k=101)
    with pytest.raises(ValueError, match="scores: expected one entry per training example"):
        vis.plot_influential(images[0], images, scores[:-1])
    with pytest.raises(ValueError, match="indices: expected values in"):
        vis.plot_influential(images[0], images, [1.0, 2.0], [0, 500], k=1)
    with pytest.raises(ValueError, match="labels"):
        vis.plot_influential(images[0], images, scores, labels=labels[:5])
    with pytest.raises(ValueError, match="mislabeled"):
        vis.plot_influential(images[0], images, scores, mislabeled=np.zeros(5, dtype=bool))


def test_self_influence_histogram_and_detection_curve(tmp_path):
    rng = np.random.default_rng(0)
    mis = np.zeros(400, dtype=bool)
    mis[rng.choice(400, 20, replace=False)] = True
    si = rng.standard_normal(400) + 2.0 * mis
    fig, (hist_ax, curve_ax) = vis.plot_self_influence(torch.tensor(si), torch.tensor(mis), flag_fraction=0.05)
    clean_bars, mis_bars = hist_ax.containers
    assert sum(b.get_height() for b in clean_bars) == 380
    assert sum(b.get_height() for b in mis_bars) == 20
    flagged = np.argsort(-si)[:20]
    assert f"{mis[flagged].sum()} of the 20 flagged are mislabelled (20 in all)" in hist_ax.get_title()
    curve = curve_ax.lines[0]
    found = np.r_[0, np.cumsum(mis[np.argsort(-si)])] / 20
    np.testing.assert_allclose(curve.get_ydata(), found)
    np.testing.assert_allclose(curve.get_xdata(), np.arange(401) / 400)
    auc = float(re.search(r"AUC ([0-9.]+)", curve.get_label()).group(1))
    assert auc == pytest.approx(roc_auc_score(mis, si), abs=5e-4)
    assert curve_ax.get_xlabel().startswith("fraction of training set inspected")
    all_found = np.argmax(found >= 1) / 400
    assert curve_ax.get_xlim()[1] == pytest.approx(min(1.0, 1.3 * max(all_found, 0.1)))
    assert hist_ax.get_yscale() == "linear"  # no bin dwarfs the others
    _render(fig, tmp_path)

    fig, ax = vis.plot_self_influence(si, flag_fraction=0.1)
    assert sum(b.get_height() for b in ax.containers[0]) == 400
    assert ax.get_legend_handles_labels()[1][1].startswith("top 40 flagged")
    _render(fig, tmp_path, "plain")


def test_self_influence_names_the_method_uses_log_counts_and_the_axis(tmp_path):
    rng = np.random.default_rng(1)
    n = 1000
    mis = np.zeros(n, dtype=bool)
    mis[:50] = True
    si = np.where(mis, rng.uniform(2.0, 6.0, n), rng.exponential(0.05, n))  # one bin holds most clean examples
    fig, (hist_ax, curve_ax) = vis.plot_self_influence(si, mis, method="TracInCP")
    counts = np.histogram(si, bins=30)[0]
    assert counts.max() > 10 * np.median(counts[counts > 0])
    assert hist_ax.get_yscale() == "log" and "log" in hist_ax.get_ylabel()
    assert hist_ax.get_title().startswith("TracInCP self-influence of 1000 training examples")
    assert curve_ax.get_title() == "Mislabel detection by TracInCP"
    # all 50 are found after 5% of the set: the axis shows the first 13% (1.3 x twice the flagged 5%)
    assert curve_ax.get_xlim() == pytest.approx((0.0, 0.13))
    perfect = [line for line in curve_ax.lines if line.get_label() == "perfect order"][0]
    np.testing.assert_allclose(perfect.get_ydata()[[0, 25, 50, 51]], [0.0, 0.5, 1.0, 1.0])
    _render(fig, tmp_path)
    assert vis.plot_self_influence(si, log_counts=False)[1].get_yscale() == "linear"
    with pytest.raises(ValueError, match="^log_counts"):
        vis.plot_self_influence(si, log_counts="yes")


def test_self_influence_bad_input():
    si = np.arange(10.0)
    with pytest.raises(ValueError, match="is_mislabeled: expected one entry"):
        vis.plot_self_influence(si, np.zeros(9, dtype=bool))
    with pytest.raises(ValueError, match="flag_fraction"):
        vis.plot_self_influence(si, flag_fraction=0)
    with pytest.raises(ValueError, match="ax: expected 2"):
        _, ax = plt.subplots()
        vis.plot_self_influence(si, np.arange(10) < 2, ax=ax)


def test_completeness_lines_on_log_scales(tmp_path):
    n_steps = [4, 8, 16, 32]
    deltas = torch.tensor([[1e-2, -3e-3, 2e-4], [2.5e-3, 1e-3, 0.0], [6e-4, -2e-4, 1e-5], [1.6e-4, 5e-5, 0.0]])
    fig, ax = vis.plot_completeness(n_steps, deltas, labels=["a", "b", "c"], tolerance=1e-4)
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log"
    example_lines = [line for line in ax.lines if line.get_label() in ("a", "b", "c")]
    assert len(example_lines) == 3
    floor = 1e-5 / 10
    np.testing.assert_allclose(example_lines[0].get_ydata(), deltas[:, 0].abs().numpy())
    np.testing.assert_allclose(example_lines[2].get_ydata(), [2e-4, floor, 1e-5, floor])
    assert len(ax.collections[0].get_offsets()) == 2  # the two exact zeros, marked
    assert ax.get_xlabel() == "n_steps" and ax.get_ylabel() == "|sum(attr) - (F(x) - F(x'))|"
    assert [line.get_ydata()[0] for line in ax.lines if line.get_label() == "tolerance 0.0001"] == [1e-4]
    _render(fig, tmp_path)
    _, ax = vis.plot_completeness(n_steps, deltas[:, 0])
    assert len(ax.lines) == 1
    with pytest.raises(ValueError, match="deltas: expected shape"):
        vis.plot_completeness(n_steps, deltas.T)
    with pytest.raises(ValueError, match="n_steps: expected positive integers"):
        vis.plot_completeness([4, 8.5, 16, 32], deltas)
    with pytest.raises(ValueError, match="labels: expected 3"):
        vis.plot_completeness(n_steps, deltas, labels=["a"])


def test_completeness_in_relative_error_with_the_target_and_the_legend_outside(tmp_path):
    n_steps = [2, 4, 8, 16]
    change = torch.tensor([2.0, -0.5, 0.01])  # F(x) - F(x') of each example
    deltas = torch.tensor([[0.2, 0.05, 1e-4], [2e-3, 1e-3, 3e-5], [1e-4, 2e-5, 1e-6], [1e-6, 1e-7, 1e-8]])
    fig, ax = vis.plot_completeness(n_steps, deltas, output_change=change, labels=list("abc"), method="IG in logits")
    lines = {line.get_label(): line for line in ax.lines}
    for j, name in enumerate("abc"):
        np.testing.assert_allclose(lines[name].get_ydata(), (deltas[:, j].abs() / change[j].abs()).numpy(), rtol=1e-6)
    target = lines["tolerance 0.001"]  # n_steps="auto"'s default target, drawn by default
    assert list(target.get_ydata()) == [1e-3, 1e-3]
    assert ax.get_yscale() == "log" and "/ |F(x) - F(x')|" in ax.get_ylabel()
    assert ax.get_title() == "IG in logits: relative completeness error"
    fig.canvas.draw()
    legend_box, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend_box.x0 >= axes_box.x1  # beside the curves, not over them
    _render(fig, tmp_path)
    _, ax = vis.plot_completeness(n_steps, deltas, output_change=change, tolerance=None, legend=False)
    assert ax.get_legend() is None and len(ax.lines) == 3
    with pytest.raises(ValueError, match=r"^output_change: examples \[1\] have F\(x\) = F\(x'\)"):
        vis.plot_completeness(n_steps, deltas, output_change=[1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="^output_change: expected one entry per example"):
        vis.plot_completeness(n_steps, deltas, output_change=[1.0, 2.0])


def test_lds_scatter_with_spearman_in_title(tmp_path):
    rng = np.random.default_rng(0)
    predicted = rng.standard_normal(50)
    actual = predicted + rng.standard_normal(50)
    fig, ax = vis.plot_lds(torch.tensor(predicted), actual, title="test example 3")
    rho = _number(ax.get_title(), "Spearman ρ")
    assert rho == pytest.approx(round(spearmanr(predicted, actual).statistic, 3), abs=1e-9)
    assert ax.get_title().startswith("test example 3\n")
    assert (
        vis.plot_lds(predicted, actual, method="TRAK", title="test example 3")[1]
        .get_title()
        .startswith("TRAK, test example 3\nSpearman")
    )
    assert len(ax.collections[0].get_offsets()) == 50
    _render(fig, tmp_path)

    fig, axes = plt.subplots(1, 2)
    out_fig, out_ax = vis.plot_lds(predicted, np.full(50, 2.0), ax=axes[0])
    assert out_fig is fig and out_ax is axes[0]
    assert out_ax.get_title() == "Spearman ρ undefined (actual constant)"
    with pytest.raises(ValueError, match="actual: expected one entry per predicted output"):
        vis.plot_lds(predicted, actual[:-1])
    with pytest.raises(ValueError, match="predicted: expected a 1-D"):
        vis.plot_lds(predicted.reshape(5, 10), actual)
