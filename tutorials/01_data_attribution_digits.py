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
# # Data attribution on digits: TRAK vs TracIn
#
# *Which training examples made the model say this?* This tutorial answers it twice, on the same
# model and data, and measures which answer predicts what retraining would do.
#
# - **TracIn** (Pruthi et al., 2020) follows one training run through its checkpoints $\theta_c$:
#   $$\mathrm{TracInCP}(z, z') = \sum_c \eta_c \,\langle \nabla_\theta \ell(z; \theta_c),
#   \nabla_\theta \ell(z'; \theta_c)\rangle,$$
#   with $\eta_c$ the learning rate at checkpoint $c$.
# - **TRAK** (Park et al., 2023) linearises each of $M$ independently trained models around its
#   weights:
#   $$\tau(z, z_i) = \Big[\tfrac1M \sum_m \phi_m(z)^\top (\Phi_m^\top \Phi_m + \lambda I)^{-1}
#   \phi_m(z_i)\Big]\, \bar Q_i,$$
#   with $\phi_m$ the (randomly projected) gradient of the margin $\log \frac{p_y}{1 - p_y}$ and
#   $Q_i = 1 - p_{y_i}$.
#
# Both return scores shaped `(n_test, n_train)`, oriented as in `captum.influence`: a positive
# score means the training example pushes the test example's prediction the right way
# (a *proponent*), a negative one pushes it the wrong way (an *opponent*).

# %%
import os
import tempfile
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import captum_influence as ci

_ = torch.manual_seed(0)
# The models here are tiny: one thread is faster than several handing work back and forth (much
# faster when other programs share the cores).
torch.set_num_threads(1)

# %% [markdown]
# ## Data and a model trained with checkpoints
#
# scikit-learn's 8x8 digits (bundled, nothing to download): 1,297 training and 500 test images. A
# batch is a tuple `(inputs, labels)`, as everywhere in `captum.influence`, so a `TensorDataset`
# is all the data attribution classes need.

# %%
x, y = load_digits(return_X_y=True)
x = torch.tensor(x / 16.0, dtype=torch.float32)
y = torch.tensor(y)
order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
x_train, y_train = x[order[:1297]], y[order[:1297]]
x_test, y_test = x[order[1297:]], y[order[1297:]]
train_set = TensorDataset(x_train, y_train)
test = (x_test, y_test)
print(f"{len(train_set)} training and {len(y_test)} test digits")

# %% [markdown]
# TracIn needs checkpoints of one training run. We save one every 5 epochs to a directory;
# `checkpoints` may be that directory (its files in natural order), a list of paths, or a list of
# state dicts. `checkpoints_load_func(model, checkpoint)` loads one into the model and returns its
# weight $\eta_c$, the learning rate (Captum's convention).

# %%
LR = 1e-2


def make_model():
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def train(xs, ys, seed, epochs=20, checkpoint_dir=None):
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=1e-3)
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(ys)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
        if checkpoint_dir is not None and epoch % 5 == 0:
            torch.save(model.state_dict(), os.path.join(checkpoint_dir, f"epoch_{epoch:02d}.pt"))
    return model.eval()


def load_checkpoint(model, path):
    model.load_state_dict(torch.load(path, weights_only=True))
    return LR


def accuracy(model):
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


checkpoint_dir = tempfile.mkdtemp()
model = train(x_train, y_train, seed=0, checkpoint_dir=checkpoint_dir)
print(sorted(os.listdir(checkpoint_dir)), f"test accuracy {accuracy(model):.3f}")

# %% [markdown]
# ## TracIn
#
# `influence(inputs)` scores every training example for every test example; with `k=` it returns
# Captum's `KMostInfluentialResults` (indices and scores of the `k` proponents, or opponents with
# `proponents=False`).

# %%
start = time.perf_counter()
tracin = ci.TracInCP(make_model(), train_set, checkpoint_dir, load_checkpoint)
tracin_scores = tracin.influence(test)
print(f"TracInCP scores {tuple(tracin_scores.shape)} in {time.perf_counter() - start:.2f} s")

t = 0  # the test digit we look at
top = tracin.influence((x_test[t : t + 1], y_test[t : t + 1]), k=4)
print("proponents", top.indices[0].tolist(), top.influence_scores[0])

# %%
images = x_train.reshape(-1, 8, 8)
fig, axes = ci.visualization.plot_influential(
    x_test[t].reshape(8, 8),
    images,
    tracin_scores[t],
    k=4,
    labels=y_train,
    test_label=y_test[t].item(),
    method="TracInCP",
)
plt.show()

# %% [markdown]
# The proponents are digits of the same class drawn the same way; the opponents are digits of
# other classes that look like this one.
#
# `TracInCPFast` restricts TracIn to the last linear layer, whose per-example gradient is an outer
# product $d\,a^\top$ of the layer's output gradient and input, so
# $\langle g, g'\rangle = (d \cdot d')(a \cdot a' + 1)$ without ever forming a gradient. It gives exactly
# TracInCP restricted to that layer (Captum's version drops the bias term $d \cdot d'$):

# %%
fast = ci.TracInCPFast(make_model(), "2", train_set, checkpoint_dir, load_checkpoint)
last_layer = ci.TracInCP(make_model(), train_set, checkpoint_dir, load_checkpoint, layers=["2"])
fast_scores, layer_scores = fast.influence(test), last_layer.influence(test)
print(
    f"max |fast - TracInCP(layers=['2'])| = {(fast_scores - layer_scores).abs().max():.2e} "
    f"(scores up to {layer_scores.abs().max():.2f})"
)
assert torch.allclose(fast_scores, layer_scores, rtol=1e-4, atol=1e-4)

# %% [markdown]
# ## TRAK
#
# TRAK's checkpoints are independently trained models (an ensemble). Three small models are enough
# here; more models help more than anything else. The gradients are projected to `projection_dim`
# dimensions with a seeded random projection, and $\lambda$ is picked from the data
# (`damping="auto"`). This MLP has only 2,410 parameters: projecting them to thousands of
# dimensions would cost more than it saves, so we ask for 512, which on this data gives nearly the
# LDS of exact gradients (`projection_dim=None`) in a fraction of the time.

# %%
ensemble = [model] + [train(x_train, y_train, seed=s) for s in (1, 2)]
start = time.perf_counter()
trak = ci.TRAK(make_model(), train_set, [m.state_dict() for m in ensemble], projection_dim=512)
trak_scores = trak.influence(test)
print(
    f"TRAK scores {tuple(trak_scores.shape)} in {time.perf_counter() - start:.2f} s "
    f"(projection_dim={trak.projection_dim})"
)

fig, axes = ci.visualization.plot_influential(
    x_test[t].reshape(8, 8), images, trak_scores[t], k=4, labels=y_train, test_label=y_test[t].item(), method="TRAK"
)
plt.show()

# %% [markdown]
# ## How far do they agree?
#
# Rank correlation of the two methods' scores for each test digit, the overlap of their top-10
# proponents, and how often a top-5 proponent carries the test digit's label.

# %%
rho = np.mean([ci.metrics.spearman(trak_scores[i], tracin_scores[i]) for i in range(len(y_test))])
top_trak, top_tracin = trak_scores.topk(10, dim=1).indices, tracin_scores.topk(10, dim=1).indices
overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top_trak, top_tracin)])
print(f"mean Spearman correlation TRAK vs TracIn: {rho:.3f}")
print(f"top-10 proponents in common:              {overlap:.2f}")
for name, scores in (("TRAK", trak_scores), ("TracIn", tracin_scores)):
    same = (y_train[scores.topk(5, dim=1).indices] == y_test[:, None]).float().mean()
    print(f"{name:>6}: top-5 proponents with the test label {same:.3f}")


# %% [markdown]
# ## Which scores predict retraining? The linear datamodeling score
#
# Scores are meant to answer a counterfactual: *what would the model say had it been trained on
# a subset $S$?* The linear datamodeling score (LDS) checks it: train models on random halves
# $S_j$ of the training set, record each test digit's margin $f_t(S_j)$, predict it by the sum of
# the scores over the half, $g_t(S_j) = \sum_{i \in S_j} \tau(z_t, z_i)$, and take the Spearman
# correlation over $j$, averaged over the test digits (`ci.metrics.lds`). 32 halves, trained one
# after another, take about ten seconds on one core.


# %%
def margins(model, xs, ys):
    with torch.no_grad():
        logits = model(xs)
    correct = logits.gather(1, ys[:, None])[:, 0]
    return correct - logits.scatter(1, ys[:, None], float("-inf")).logsumexp(1)


rng = np.random.default_rng(0)
n_train, n_subsets = len(y_train), 32
subset_masks = np.zeros((n_subsets, n_train), dtype=bool)
subset_outputs = np.zeros((n_subsets, len(y_test)))
start = time.perf_counter()
for j in range(n_subsets):
    subset_masks[j, rng.choice(n_train, n_train // 2, replace=False)] = True
    idx = torch.from_numpy(np.flatnonzero(subset_masks[j]))
    subset_outputs[j] = margins(train(x_train[idx], y_train[idx], seed=100 + j), x_test, y_test).numpy()
print(f"{n_subsets} models on random halves in {time.perf_counter() - start:.1f} s")

lds = {
    name: ci.metrics.lds(scores, subset_masks, subset_outputs)
    for name, scores in (("TRAK", trak_scores), ("TracIn", tracin_scores))
}
print({name: round(value, 3) for name, value in lds.items()})
assert lds["TRAK"] > lds["TracIn"] > 0

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
for ax, (name, scores) in zip(axes, (("TRAK", trak_scores), ("TracIn", tracin_scores))):
    predicted = subset_masks.astype(np.float64) @ scores[t].double().numpy()
    ci.visualization.plot_lds(predicted, subset_outputs[:, t], method=name, title=f"test digit {t}", ax=ax)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Takeaways
#
# - The two methods rank the training set quite differently (low rank correlation, few top-10
#   proponents in common). TracIn's proponents look the most alike (they share the test label more
#   often), but TRAK's scores predict what retraining on a subset does far better (higher LDS): an
#   ensemble of models and the $(\Phi^\top\Phi + \lambda I)^{-1}$ correction are what TracIn lacks.
# - TracIn needs only one training run and is cheaper; its self-influence
#   (`tracin.self_influence()`) is a strong detector of mislabelled training examples (the demo,
#   `python -m captum_influence demo`, flips 5% of the labels and finds them).
# - Both take a `Dataset` of `(inputs, labels)` tuples, checkpoints as a directory, paths or state
#   dicts, and return Captum-oriented scores; `compute_intermediate_quantities` gives the vectors
#   whose dot products are the scores, for scoring at scale.
