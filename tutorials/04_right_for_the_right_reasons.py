# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Right for the Right Reasons: training a model to ignore a shortcut
#
# A model trained on data with a *shortcut* (a feature that predicts the label on the training set
# but not in deployment) will happily use it. Ross et al. (2017) proposed to tell the model which
# features must not matter, with a mask $A$, and to penalise the input gradients of its
# log-probabilities there:
#
# $$
# L(\theta) = \mathrm{CE}(f_\theta(x), y)
#   + \lambda \sum_{b,d} \Big(A_{bd}\, \frac{\partial}{\partial x_{bd}} \sum_k \log p_k(x_b)\Big)^2 .
# $$
#
# `ci.RRRLoss(l2_grads=λ)` computes this correctly and fast: `log_softmax` (never softmax then log), the
# input gradient of the whole batch in one `torch.autograd.grad` call with `create_graph=True`, an
# elementwise mask product, and a single scalar whose `.backward()` reaches the parameters through
# both terms.
#
# This tutorial builds *decoy digits*: scikit-learn's 8x8 digits with a small patch in the corner
# whose intensity encodes the label on the training set, and the intensity of a wrong label on
# the test set. We train the same MLP plainly and with `RRRLoss`, and look at where each one looks.

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import captum_influence as ci

_ = torch.manual_seed(0)
# The models here are tiny: one thread is faster than several handing work back and forth (much
# faster when other programs share the cores).
torch.set_num_threads(1)

# %% [markdown]
# ## Decoy digits
#
# The patch is the 2x2 block in the top-left corner, where digits have no ink. On the training
# images its intensity is `3 * (1 - 0.1 * y)`, a perfect code for the label; on the test images it
# encodes a wrong label. (It is brighter than the strokes so that a small MLP prefers it; the
# benchmark `benchmarks/rrr_decoy.py` shows what happens at ink intensity.)

# %%
x, y = load_digits(return_X_y=True)
x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 8, 8)
y = torch.tensor(y)
x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.5, random_state=0, stratify=y)

mask = torch.zeros(8, 8)  # 1 where the model must not look
mask[:2, :2] = 1.0


def add_decoy(images, code_labels):
    out = images.clone()
    out[:, :2, :2] = (3.0 * (1.0 - 0.1 * code_labels.float()))[:, None, None]
    return out


wrong = (y_test + torch.randint(1, 10, y_test.shape)) % 10
decoy_train, decoy_test = add_decoy(x_train, y_train), add_decoy(x_test, wrong)

fig, axes = plt.subplots(1, 6, figsize=(9, 2.0), layout="constrained")
for ax, img, label in zip(axes, decoy_train, y_train):
    ax.imshow(img, cmap="gray_r", vmin=0, vmax=3)
    ax.set_title(f"label {label.item()}")
    ax.axis("off")
fig.suptitle("training images: the corner patch encodes the label")
plt.show()


# %% [markdown]
# ## Plain training and RRR training
#
# The same MLP, seed and optimiser; the only difference is the loss. `RRRLoss` takes the model and the
# batch, so it drops into any training loop. The mask `(8, 8)` broadcasts over the batch; a mask of
# shape `(B, 8, 8)` gives a different mask per example, and a tuple of inputs takes a tuple of
# masks (`None` for an input that is not penalised).


# %%
def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train(images, labels, loss_of, epochs=20, seed=0):
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for i in range(0, len(images), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            loss_of(model, images[idx], labels[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model, images, labels):
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


cross_entropy = lambda model, xb, yb: F.cross_entropy(model(xb), yb)
rrr_loss = ci.RRRLoss(l2_grads=10.0)
rrr = lambda model, xb, yb: rrr_loss(model, xb, yb, mask)

decoy_free_model = train(x_train, y_train, cross_entropy)
plain_model = train(decoy_train, y_train, cross_entropy)
rrr_model = train(decoy_train, y_train, rrr)

print(f"decoy-free model on clean test images: {accuracy(decoy_free_model, x_test, y_test):.3f}")
print(f"plain model on decoy test images:      {accuracy(plain_model, decoy_test, y_test):.3f}")
print(f"RRR model on decoy test images:        {accuracy(rrr_model, decoy_test, y_test):.3f}")
print("last RRR batch:", rrr_loss.last_terms)


# %% [markdown]
# The plain model reaches near-perfect training accuracy, but a good part of it comes from the
# patch: when the patch lies, it follows the patch. The RRR model was never allowed a gradient
# on the patch, so it learned the strokes and keeps the decoy-free accuracy.
#
# `rrr_loss.last_terms` holds the two terms of the last loss (detached), handy for logging:
# `loss = cross_entropy + l2_grads * penalty`.
#
# ## Where do the models look?
#
# The input gradient $\partial/\partial x \sum_k \log p_k(x)$ is the explanation that RRR constrains. For
# an MLP the examples do not interact, so one `torch.autograd.grad` call on the summed outputs gives
# every example's own gradient. The gradient is per unit of intensity, and the patch (up to 3) is
# brighter than the strokes (at most 1): a gradient of ordinary size there moves the output a lot.
# Gradient times input, each pixel's first-order contribution to the output, shows that.


# %%
def input_gradients(model, images):
    images = images.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.log_softmax(model(images), 1).sum(), images)
    return g


def patch_share(values):
    values = values.abs()
    return (values * mask).sum((1, 2)) / values.sum((1, 2))


models = {"plain": plain_model, "RRR": rrr_model}
print(f"share of the mass on the patch, mean over the test images (uniform: {4 / 64:.1%})")
for name, model in models.items():
    g = input_gradients(model, decoy_test)
    print(
        f"  {name:>5}: |gradient| {patch_share(g).mean():.2%}, "
        f"|gradient x input| {patch_share(g * decoy_test).mean():.2%}"
    )

# %% [markdown]
# The first five test images (not picked), gradient times input of both models on one colour scale,
# with the share of it on the patch: the plain model leans on the patch in most of them, the RRR
# model in none.

# %%
examples = decoy_test[:5]
contributions = {name: input_gradients(model, examples) * examples for name, model in models.items()}
scale = max(c.abs().max().item() for c in contributions.values())
fig, axes = plt.subplots(3, 5, figsize=(9, 6.4), layout="constrained")
for j in range(5):
    axes[0, j].imshow(examples[j], cmap="gray_r", vmin=0, vmax=3)
    axes[0, j].set_title(f"label {y_test[j].item()}, patch says {wrong[j].item()}", fontsize=8)
    axes[0, j].set_xticks([])
    axes[0, j].set_yticks([])
for i, (name, model) in enumerate(models.items(), start=1):
    with torch.no_grad():
        predicted = model(examples).argmax(1)
    share = patch_share(contributions[name])
    for j in range(5):
        ci.visualization.plot_attributions(
            contributions[name][j],
            sign="all",
            scale=scale,
            show_colorbar=False,
            ax=axes[i, j],
            title=f"{name}: predicts {predicted[j].item()}\n{share[j]:.0%} on the patch",
        )
        axes[i, j].title.set_fontsize(8)
bar = fig.colorbar(axes[1, 0].images[0], ax=axes[1:, :], shrink=0.6)
bar.set_ticks([-1, 0, 1], labels=[f"-{scale:.2g}", "0", f"+{scale:.2g}"])
bar.set_label("gradient x input: - lowers, + raises sum_k log p_k")
fig.suptitle("Where each model looks: gradient x input (patch in the top-left 2x2)")
plt.show()

# %% [markdown]
# Averaged over the test set, the magnitude of the input gradient itself, on one scale for both
# models: on the patch the plain model's gradient is among its largest, the RRR model's is zero.

# %%
mean_abs = {name: input_gradients(model, decoy_test).abs().mean(0) for name, model in models.items()}
top = max(m.max().item() for m in mean_abs.values())
fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.2), layout="constrained")
for ax, (name, values) in zip(axes, mean_abs.items()):
    image = ax.imshow(values, cmap="magma", vmin=0, vmax=top)
    ax.set_title(f"{name}: mean |gradient|")
    ax.axis("off")
fig.colorbar(image, ax=axes, fraction=0.046, label="mean |d sum_k log p_k / dx|")
plt.show()

# %% [markdown]
# ## Good to know
#
# - **Targets.** `target="log_probs"` (default) explains $\sum_k \log p_k$ as in Ross et al.;
#   `"true_log_prob"` explains only the labelled class, $\log p_y$; `"logits"` explains $\sum_k z_k$.
# - **Reduction.** With `reduction="mean"` (default) both terms are averaged over the batch, so
#   `l2_grads` does not depend on the batch size; `reduction="sum"` gives Ross et al.'s summed objective.
# - **Zero mask = plain training.** A mask of zeros gives exactly `F.cross_entropy` and the same
#   optimiser step, dropout draws included: the cross-entropy reuses the forward pass of the penalty.
# - **BatchNorm in training mode** couples the examples of a batch, so the batched input gradient is
#   not each example's own; `RRRLoss` warns once. Use eval-mode normalisation, GroupNorm or LayerNorm.
# - **Saturating activations** (tanh, sigmoid) can flatten the gradient at the training points while
#   the output still depends on the masked features; ReLU networks leave no such way out.
# - **Probabilities.** The model must return logits; `ci.select_output(model, "logits")` removes a final
#   softmax, and `RRRLoss` warns if the outputs look like probabilities.
