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
# # Logits or probabilities? Integrated Gradients and DeepLift with completeness checks
#
# Attribution methods such as Integrated Gradients (IG) and DeepLift promise **completeness**: the
# attributions of an input $x$ add up to the change of the output from a baseline $x'$,
#
# $$\sum_i A_i(x) = F(x) - F(x').$$
#
# But *which* output? Many classifiers end in `F.softmax(...)` inside `forward`, and then $F$ is a
# probability; others return logits. Both questions are legitimate ("why this logit?" and "why
# this probability?"), yet the methods do not behave the same in both spaces, and one of them fails
# silently. This tutorial shows the pitfall, and how `ci.select_output`, `ci.find_output_nonlinearities`
# and `ci.check_completeness` catch and fix it.

# %%
import warnings

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from captum.attr import DeepLift
from captum.attr import IntegratedGradients as CaptumIntegratedGradients
from sklearn.datasets import load_digits
from torch import nn

import captum_influence as ci

warnings.filterwarnings("ignore", category=UserWarning, module="captum")  # Captum's notes on hooks
_ = torch.manual_seed(0)
# The models here are tiny: one thread is faster than several handing work back and forth (much
# faster when other programs share the cores).
torch.set_num_threads(1)


# %% [markdown]
# ## A model that returns probabilities
#
# The common pattern: the softmax is a function call in `forward`. We train it through
# `ci.select_output(model, "log_probs")`, a module sharing the model's parameters that finds the
# logits under the softmax and returns a stable `log_softmax` of them (no `log(softmax(...))`).


# %%
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(64, 32)
        self.act = nn.ReLU()
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        return F.softmax(self.out(self.act(self.hidden(x))), dim=1)


x, y = load_digits(return_X_y=True)
x = torch.tensor(x / 16.0, dtype=torch.float32)
y = torch.tensor(y)
x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]

model = Net()
log_probs = ci.select_output(model, "log_probs")
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(20):
    for idx in torch.randperm(len(y_train)).split(64):
        opt.zero_grad()
        F.nll_loss(log_probs(x_train[idx]), y_train[idx]).backward()
        opt.step()
model.eval()
with torch.no_grad():
    print(f"test accuracy {(model(x_test).argmax(1) == y_test).float().mean():.3f}")

# %% [markdown]
# `find_output_nonlinearities` lists what lies between the last layer with parameters and the
# output, and whether module hooks (what DeepLift relies on) can see it:

# %%
for finding in ci.find_output_nonlinearities(model, x_test[:1]):
    print(finding)

# %% [markdown]
# ## Integrated Gradients in both spaces
#
# `ci.select_output(model, "logits")` returns the logits under the softmax; the model itself returns
# probabilities. `ci.IntegratedGradients` is Captum's method with batched path gradients and a
# completeness guarantee: `n_steps="auto"` refines each example until
# $|\delta| \le 10^{-3}\,|F(x) - F(x')|$, and `ig.convergence` says how many steps each one took.

# %%
x_explain = x_test[:8]
with torch.no_grad():
    target = model(x_explain).argmax(1)
spaces = {"logits": ci.select_output(model, "logits"), "probabilities": model}

attributions = {}
for name, forward in spaces.items():
    ig = ci.IntegratedGradients(forward)
    attributions[name] = ig.attribute(x_explain, target=target, n_steps="auto")
    conv = ig.convergence
    print(f"{name:>13}: steps {conv.n_steps.tolist()}, max relative error {conv.relative_error.max():.1e}")

# %% [markdown]
# The steps needed differ from example to example, in both spaces: the ReLU kinks make the logits'
# integrand piecewise smooth (Gauss-Legendre quadrature likes smooth), and the softmax bends the
# probabilities' path. A single fixed `n_steps` is either wasteful or too small somewhere, which
# is why `"auto"` refines each example on its own. The relative error
# $|\delta| / |F(x) - F(x')|$ against `n_steps`, per example, with the $10^{-3}$ that `"auto"` reaches:

# %%
steps = [2, 4, 8, 16, 32, 64]
baseline = torch.zeros_like(x_explain)
output_change = {}
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for ax, (name, forward) in zip(axes, spaces.items()):
    with torch.no_grad():
        output_change[name] = (forward(x_explain) - forward(baseline)).gather(1, target[:, None])[:, 0]
    ig = ci.IntegratedGradients(forward)
    deltas = [ig.attribute(x_explain, target=target, n_steps=s, return_convergence_delta=True)[1] for s in steps]
    ci.visualization.plot_completeness(
        steps,
        torch.stack(deltas),
        output_change=output_change[name],
        labels=[f"digit {i}" for i in range(len(target))],
        method=f"IG in {name}",
        legend=ax is axes[-1],  # one legend, beside the right panel
        ax=ax,
    )
axes[1].set_ylabel("")
fig.tight_layout()
plt.show()

# %% [markdown]
# Both attributions are complete, but they answer different questions. In probability space the
# attribution of class $c$ also counts evidence *against the other classes*, and it saturates: once
# $p_c$ is close to 1, pixels that raise the logit further change nothing.
#
# To compare the two on one colour scale, divide each by its own output change $F(x) - F(x')$:
# both then sum to 1, and their difference shows where the probability's explanation puts more
# (green) or less (red) of the credit. We show the example of the eight where they differ most.

# %%
shares = {name: attributions[name] / output_change[name][:, None] for name in spaces}
difference = shares["probabilities"] - shares["logits"]
i = int(difference.abs().sum(1).argmax())
panels = [(f"IG in {name}, F(x) - F(x') = {output_change[name][i]:.3g}", shares[name][i]) for name in spaces]
panels.append(("probabilities - logits", difference[i]))
scale = max(values.abs().max().item() for _, values in panels)  # one scale for the three panels
fig, axes = plt.subplots(1, 4, figsize=(13, 4), layout="constrained")
axes[0].imshow(x_explain[i].reshape(8, 8), cmap="gray")
axes[0].set_title(f"test digit {i}: label {y_test[i].item()}, predicted {target[i].item()}")
axes[0].set_axis_off()
for ax, (title, values) in zip(axes[1:], panels):
    ci.visualization.plot_attributions(values.reshape(8, 8), sign="all", scale=scale, title=title, ax=ax)
    ax.images[-1].colorbar.set_label("share of F(x) - F(x')" if ax is not axes[-1] else "difference of shares")
plt.show()

# %% [markdown]
# ## The pitfall: DeepLift and a functional softmax
#
# DeepLift replaces the gradient of each nonlinearity by a finite-difference ratio, through hooks
# on `nn.Module` activations. A softmax called as a function is invisible to those hooks, so
# DeepLift silently takes its plain gradient there, and the attributions no longer add up. Captum
# returns them without a word; `ci.check_completeness` measures
# $\delta = \sum_i A_i - (F(x) - F(x'))$ on the model's own outputs and names the cause:

# %%
report = ci.check_completeness(DeepLift(model), x_explain, target=target)
print(report)
print("sum of attributions:", report.delta[:4] + report.output_change[:4])
print("F(x) - F(x'):       ", report.output_change[:4])
assert not report.passed and report.suspects[0].kind == "functional_nonlinearity"

# %% [markdown]
# The fix it suggests: attribute the logits. Through `select_output(model, "logits")` DeepLift sees
# only `Linear` and `ReLU` layers, where its rescale rule is exact.

# %%
report = ci.check_completeness(DeepLift(ci.select_output(model, "logits")), x_explain, target=target)
print(report)
assert report.passed

# %% [markdown]
# What about DeepLift on probabilities with a softmax *module* that the hooks do see
# (`select_output(model, "probs")` applies one)? Still not complete: DeepLift's rule rescales each
# output by the change of its own input, and a softmax mixes all of them.

# %%
report = ci.check_completeness(DeepLift(ci.select_output(model, "probs")), x_explain, target=target)
print(report)

# %% [markdown]
# ## The other usual cause: too few steps
#
# Completeness also catches an under-resolved integral. Captum's own `IntegratedGradients` with 4
# steps is checked the same way; the report measures how the error falls with more steps:

# %%
report = ci.check_completeness(CaptumIntegratedGradients(model), x_explain, target=target, n_steps=4)
print(report)

# %% [markdown]
# ## Summary
#
# | question | method | completeness |
# | --- | --- | --- |
# | why this logit? | IG or DeepLift on `select_output(model, "logits")` | exact (IG: `n_steps="auto"`) |
# | why this probability? | IG on the model or `select_output(model, "probs")` | exact with enough steps |
# | why this probability? | DeepLift | not complete, with a functional softmax badly so |
#
# Run `ci.check_completeness(method, inputs, target=...)` once on a few examples whenever you pick
# an attribution method for a model: it works on any Captum method with a convergence delta, and
# its `suspects` say what to change.
