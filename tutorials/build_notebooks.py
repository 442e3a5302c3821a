"""Write tutorials 01-03 as notebooks without outputs (04 is written by hand).

    python tutorials/build_notebooks.py        # rewrites 01_*.ipynb, 02_*.ipynb, 03_*.ipynb

The cells below are the source of those notebooks: edit them here, then rerun. The tests
(tests/test_tutorials.py) execute every notebook in this directory and check that the committed
files carry no outputs.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


# ---------------------------------------------------------------------------------------------
DATA_ATTRIBUTION = [
    md(r"""
# Data attribution on digits: TRAK vs TracIn

*Which training examples made the model say this?* This tutorial answers it twice, on the same
model and data, and measures which answer predicts what retraining would do.

- **TracIn** (Pruthi et al., 2020) follows one training run through its checkpoints $\theta_c$:
  $\mathrm{TracInCP}(z, z') = \sum_c \eta_c \,\langle \nabla_\theta \ell(z; \theta_c), \nabla_\theta \ell(z'; \theta_c)\rangle$,
  with $\eta_c$ the learning rate at checkpoint $c$.
- **TRAK** (Park et al., 2023) linearises each of $M$ independently trained models around its
  weights: $\tau(z, z_i) = \big[\tfrac1M \sum_m \phi_m(z)^\top (\Phi_m^\top \Phi_m + \lambda I)^{-1} \phi_m(z_i)\big]\, \bar Q_i$,
  with $\phi_m$ the (randomly projected) gradient of the margin $\log \frac{p_y}{1 - p_y}$ and
  $Q_i = 1 - p_{y_i}$.

Both return scores shaped `(n_test, n_train)`, oriented as in `captum.influence`: a positive
score means the training example pushes the test example's prediction the right way
(a *proponent*), a negative one pushes it the wrong way (an *opponent*).
"""),
    code(r"""
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
"""),
    md(r"""
## Data and a model trained with checkpoints

scikit-learn's 8x8 digits (bundled, nothing to download): 1,297 training and 500 test images. A
batch is a tuple `(inputs, labels)`, as everywhere in `captum.influence`, so a `TensorDataset`
is all the data attribution classes need.
"""),
    code(r"""
x, y = load_digits(return_X_y=True)
x = torch.tensor(x / 16.0, dtype=torch.float32)
y = torch.tensor(y)
order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
x_train, y_train = x[order[:1297]], y[order[:1297]]
x_test, y_test = x[order[1297:]], y[order[1297:]]
train_set = TensorDataset(x_train, y_train)
test = (x_test, y_test)
print(f"{len(train_set)} training and {len(y_test)} test digits")
"""),
    md(r"""
TracIn needs checkpoints of one training run. We save one every 5 epochs to a directory;
`checkpoints` may be that directory (its files in natural order), a list of paths, or a list of
state dicts. `checkpoints_load_func(model, checkpoint)` loads one into the model and returns its
weight $\eta_c$, the learning rate (Captum's convention).
"""),
    code(r"""
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
"""),
    md(r"""
## TracIn

`influence(inputs)` scores every training example for every test example; with `k=` it returns
Captum's `KMostInfluentialResults` (indices and scores of the `k` proponents, or opponents with
`proponents=False`).
"""),
    code(r"""
start = time.perf_counter()
tracin = ci.TracInCP(make_model(), train_set, checkpoint_dir, load_checkpoint)
tracin_scores = tracin.influence(test)
print(f"TracInCP scores {tuple(tracin_scores.shape)} in {time.perf_counter() - start:.2f} s")

t = 0  # the test digit we look at
top = tracin.influence((x_test[t : t + 1], y_test[t : t + 1]), k=4)
print("proponents", top.indices[0].tolist(), top.influence_scores[0])
"""),
    code(r"""
images = x_train.reshape(-1, 8, 8)
fig, axes = ci.visualization.plot_influential(
    x_test[t].reshape(8, 8), images, tracin_scores[t], k=4, labels=y_train, test_label=y_test[t].item()
)
fig.suptitle("TracInCP", y=1.02)
plt.show()
"""),
    md(r"""
The proponents are digits of the same class drawn the same way; the opponents are digits of
other classes that look like this one.

`TracInCPFast` restricts TracIn to the last linear layer, whose per-example gradient is an outer
product $d\,a^\top$ of the layer's output gradient and input, so
$\langle g, g'\rangle = (d \cdot d')(a \cdot a' + 1)$ without ever forming a gradient. It gives exactly
TracInCP restricted to that layer (Captum's version drops the bias term $d \cdot d'$):
"""),
    code(r"""
fast = ci.TracInCPFast(make_model(), "2", train_set, checkpoint_dir, load_checkpoint)
last_layer = ci.TracInCP(make_model(), train_set, checkpoint_dir, load_checkpoint, layers=["2"])
fast_scores, layer_scores = fast.influence(test), last_layer.influence(test)
print(f"max |fast - TracInCP(layers=['2'])| = {(fast_scores - layer_scores).abs().max():.2e} "
      f"(scores up to {layer_scores.abs().max():.2f})")
assert torch.allclose(fast_scores, layer_scores, rtol=1e-4, atol=1e-4)
"""),
    md(r"""
## TRAK

TRAK's checkpoints are independently trained models (an ensemble). Three small models are enough
here; more models help more than anything else. The gradients are projected to `projection_dim`
dimensions ("auto" by default) with a seeded random projection, and $\lambda$ is picked from the
data (`damping="auto"`).
"""),
    code(r"""
ensemble = [model] + [train(x_train, y_train, seed=s) for s in (1, 2)]
start = time.perf_counter()
trak = ci.TRAK(make_model(), train_set, [m.state_dict() for m in ensemble])
trak_scores = trak.influence(test)
print(f"TRAK scores {tuple(trak_scores.shape)} in {time.perf_counter() - start:.2f} s "
      f"(projection_dim={trak.projection_dim})")

fig, axes = ci.visualization.plot_influential(
    x_test[t].reshape(8, 8), images, trak_scores[t], k=4, labels=y_train, test_label=y_test[t].item()
)
fig.suptitle("TRAK", y=1.02)
plt.show()
"""),
    md(r"""
## How far do they agree?

Rank correlation of the two methods' scores for each test digit, the overlap of their top-10
proponents, and how often a top-5 proponent carries the test digit's label.
"""),
    code(r"""
rho = np.mean([ci.metrics.spearman(trak_scores[i], tracin_scores[i]) for i in range(len(y_test))])
top_trak, top_tracin = trak_scores.topk(10, dim=1).indices, tracin_scores.topk(10, dim=1).indices
overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top_trak, top_tracin)])
print(f"mean Spearman correlation TRAK vs TracIn: {rho:.3f}")
print(f"top-10 proponents in common:              {overlap:.2f}")
for name, scores in (("TRAK", trak_scores), ("TracIn", tracin_scores)):
    same = (y_train[scores.topk(5, dim=1).indices] == y_test[:, None]).float().mean()
    print(f"{name:>6}: top-5 proponents with the test label {same:.3f}")
"""),
    md(r"""
## Which scores predict retraining? The linear datamodeling score

Scores are meant to answer a counterfactual: *what would the model say had it been trained on
a subset $S$?* The linear datamodeling score (LDS) checks it: train models on random halves
$S_j$ of the training set, record each test digit's margin $f_t(S_j)$, predict it by the sum of
the scores over the half, $g_t(S_j) = \sum_{i \in S_j} \tau(z_t, z_i)$, and take the Spearman
correlation over $j$, averaged over the test digits (`ci.metrics.lds`). 32 halves, trained one
after another, take a few seconds.
"""),
    code(r"""
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

lds = {name: ci.metrics.lds(scores, subset_masks, subset_outputs)
       for name, scores in (("TRAK", trak_scores), ("TracIn", tracin_scores))}
print({name: round(value, 3) for name, value in lds.items()})
assert lds["TRAK"] > lds["TracIn"] > 0
"""),
    code(r"""
fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
for ax, (name, scores) in zip(axes, (("TRAK", trak_scores), ("TracIn", tracin_scores))):
    predicted = subset_masks.astype(np.float64) @ scores[t].double().numpy()
    ci.visualization.plot_lds(predicted, subset_outputs[:, t], title=f"{name}, test digit {t}", ax=ax)
fig.tight_layout()
plt.show()
"""),
    md(r"""
## Takeaways

- The two methods rank the training set quite differently (low rank correlation, few top-10
  proponents in common). TracIn's proponents look the most alike (they share the test label more
  often), but TRAK's scores predict what retraining on a subset does far better (higher LDS): an
  ensemble of models and the $(\Phi^\top\Phi + \lambda I)^{-1}$ correction are what TracIn lacks.
- TracIn needs only one training run and is cheaper; its self-influence
  (`tracin.self_influence()`) is a strong detector of mislabelled training examples (the demo,
  `python -m captum_influence demo`, flips 5% of the labels and finds them).
- Both take a `Dataset` of `(inputs, labels)` tuples, checkpoints as a directory, paths or state
  dicts, and return Captum-oriented scores; `compute_intermediate_quantities` gives the vectors
  whose dot products are the scores, for scoring at scale.
"""),
]


# ---------------------------------------------------------------------------------------------
LOGITS_OR_PROBABILITIES = [
    md(r"""
# Logits or probabilities? Integrated Gradients and DeepLift with completeness checks

Attribution methods such as Integrated Gradients (IG) and DeepLift promise **completeness**: the
attributions of an input $x$ add up to the change of the output from a baseline $x'$,

$$\sum_i A_i(x) = F(x) - F(x').$$

But *which* output? Many classifiers end in `F.softmax(...)` inside `forward`, and then $F$ is a
probability; others return logits. Both questions are legitimate ("why this logit?" and "why
this probability?"), yet the methods do not behave the same in both spaces, and one of them fails
silently. This tutorial shows the pitfall, and how `ci.select_output`, `ci.find_output_nonlinearities`
and `ci.check_completeness` catch and fix it.
"""),
    code(r"""
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import DeepLift
from captum.attr import IntegratedGradients as CaptumIntegratedGradients
from sklearn.datasets import load_digits
from torch import nn

import captum_influence as ci

warnings.filterwarnings("ignore", category=UserWarning, module="captum")  # Captum's notes on hooks
_ = torch.manual_seed(0)
"""),
    md(r"""
## A model that returns probabilities

The common pattern: the softmax is a function call in `forward`. We train it through
`ci.select_output(model, "log_probs")`, a module sharing the model's parameters that finds the
logits under the softmax and returns a stable `log_softmax` of them (no `log(softmax(...))`).
"""),
    code(r"""
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
for epoch in range(20):
    for idx in torch.randperm(len(y_train)).split(64):
        opt.zero_grad()
        F.nll_loss(log_probs(x_train[idx]), y_train[idx]).backward()
        opt.step()
model.eval()
with torch.no_grad():
    print(f"test accuracy {(model(x_test).argmax(1) == y_test).float().mean():.3f}")
"""),
    md(r"""
`find_output_nonlinearities` lists what lies between the last layer with parameters and the
output, and whether module hooks (what DeepLift relies on) can see it:
"""),
    code(r"""
for finding in ci.find_output_nonlinearities(model, x_test[:1]):
    print(finding)
"""),
    md(r"""
## Integrated Gradients in both spaces

`ci.select_output(model, "logits")` returns the logits under the softmax; the model itself returns
probabilities. `ci.IntegratedGradients` is Captum's method with batched path gradients and a
completeness guarantee: `n_steps="auto"` refines each example until
$|\delta| \le 10^{-3}\,|F(x) - F(x')|$, and `ig.convergence` says how many steps each one took.
"""),
    code(r"""
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
"""),
    md(r"""
The steps needed differ from example to example, in both spaces: the ReLU kinks make the logits'
integrand piecewise smooth (Gauss-Legendre quadrature likes smooth), and the softmax bends the
probabilities' path. A single fixed `n_steps` is either wasteful or too small somewhere, which
is why `"auto"` refines each example on its own. The quadrature error against `n_steps`, per example:
"""),
    code(r"""
steps = [2, 4, 8, 16, 32, 64]
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for ax, (name, forward) in zip(axes, spaces.items()):
    ig = ci.IntegratedGradients(forward)
    deltas = [ig.attribute(x_explain, target=target, n_steps=s, return_convergence_delta=True)[1] for s in steps]
    ci.visualization.plot_completeness(steps, torch.stack(deltas), ax=ax)
    ax.set_title(f"IG in {name}")
fig.tight_layout()
plt.show()
"""),
    md(r"""
Both attributions are complete, but they answer different questions. In probability space the
attribution of class $c$ also counts evidence *against the other classes*, and it saturates: once
$p_c$ is close to 1, pixels that raise the logit further change nothing.
"""),
    code(r"""
i = 0
fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
axes[0].imshow(x_explain[i].reshape(8, 8), cmap="gray")
axes[0].set_title(f"label {y_test[i].item()}, predicted {target[i].item()}")
axes[0].set_axis_off()
for ax, name in zip(axes[1:], spaces):
    ci.visualization.plot_attributions(
        attributions[name][i].reshape(8, 8), x_explain[i].reshape(8, 8),
        method="blended_heat_map", sign="all", title=f"IG, {name}", ax=ax,
    )
fig.tight_layout()
plt.show()
"""),
    md(r"""
## The pitfall: DeepLift and a functional softmax

DeepLift replaces the gradient of each nonlinearity by a finite-difference ratio, through hooks
on `nn.Module` activations. A softmax called as a function is invisible to those hooks, so
DeepLift silently takes its plain gradient there, and the attributions no longer add up. Captum
returns them without a word; `ci.check_completeness` measures
$\delta = \sum_i A_i - (F(x) - F(x'))$ on the model's own outputs and names the cause:
"""),
    code(r"""
report = ci.check_completeness(DeepLift(model), x_explain, target=target)
print(report)
print("sum of attributions:", report.delta[:4] + report.output_change[:4])
print("F(x) - F(x'):       ", report.output_change[:4])
assert not report.passed and report.suspects[0].kind == "functional_nonlinearity"
"""),
    md(r"""
The fix it suggests: attribute the logits. Through `select_output(model, "logits")` DeepLift sees
only `Linear` and `ReLU` layers, where its rescale rule is exact.
"""),
    code(r"""
report = ci.check_completeness(DeepLift(ci.select_output(model, "logits")), x_explain, target=target)
print(report)
assert report.passed
"""),
    md(r"""
What about DeepLift on probabilities with a softmax *module* that the hooks do see
(`select_output(model, "probs")` applies one)? Still not complete: DeepLift's rule rescales each
output by the change of its own input, and a softmax mixes all of them.
"""),
    code(r"""
report = ci.check_completeness(DeepLift(ci.select_output(model, "probs")), x_explain, target=target)
print(report)
"""),
    md(r"""
## The other usual cause: too few steps

Completeness also catches an under-resolved integral. Captum's own `IntegratedGradients` with 4
steps is checked the same way; the report measures how the error falls with more steps:
"""),
    code(r"""
report = ci.check_completeness(CaptumIntegratedGradients(model), x_explain, target=target, n_steps=4)
print(report)
"""),
    md(r"""
## Summary

| question | method | completeness |
| --- | --- | --- |
| why this logit? | IG or DeepLift on `select_output(model, "logits")` | exact (IG up to the quadrature, `n_steps="auto"`) |
| why this probability? | IG on the model or `select_output(model, "probs")` | exact with enough steps |
| why this probability? | DeepLift | not complete, with a functional softmax badly so |

Run `ci.check_completeness(method, inputs, target=...)` once on a few examples whenever you pick
an attribution method for a model: it works on any Captum method with a convergence delta, and
its `suspects` say what to change.
"""),
]


# ---------------------------------------------------------------------------------------------
CUSTOM_TASK_TEXT = [
    md(r"""
# A custom task: data attribution for a text classifier

TRAK scores rest on a *model output function* $f(z)$ and the out-to-loss gradient
$Q = -\partial L / \partial f$ that weighs each training example. `ci.tasks` holds them
(`ModelOutput` subclasses): for classification $f$ is the margin $\log\frac{p_y}{1-p_y}$ and
$Q = 1 - p_y$.

This tutorial builds a small text classifier on generated sentences, runs TRAK with
`TextClassificationOutput` (keyword inputs, as a tokenizer produces them), looks at which words
carry a prediction, and writes a `ModelOutput` subclass for a model the built-in tasks do not
cover: a binary classifier with a single logit.
"""),
    code(r"""
import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import HTML, display
from torch import nn
from torch.utils.data import TensorDataset

import captum_influence as ci

_ = torch.manual_seed(0)
"""),
    md(r"""
## Generated sentences

Sentences of 6 to 16 words from a small vocabulary; a sentence is positive when it holds more
positive than negative words. Token ids are padded to 16 with an attention mask, as a
tokenizer would return them.
"""),
    code(r"""
POSITIVE = ["good", "great", "fine", "excellent"]
NEGATIVE = ["bad", "awful", "poor", "dull"]
NEUTRAL = ("the a movie plot actor was is and very really film story scene music ending it this "
           "quite director cast").split()
VOCAB = ["<pad>"] + POSITIVE + NEGATIVE + NEUTRAL
MAX_LEN = 16


def make_sentences(n, generator):
    input_ids = torch.zeros(n, MAX_LEN, dtype=torch.long)
    attention_mask = torch.zeros(n, MAX_LEN)
    labels = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(6, MAX_LEN + 1, (1,), generator=generator))
        while True:
            ids = torch.randint(1, len(VOCAB), (length,), generator=generator)
            score = sum(VOCAB[t] in POSITIVE for t in ids) - sum(VOCAB[t] in NEGATIVE for t in ids)
            if score != 0:
                break
        input_ids[i, :length], attention_mask[i, :length], labels[i] = ids, 1, int(score > 0)
    return input_ids, attention_mask, labels


def decode(ids, mask):
    return " ".join(VOCAB[t] for t, m in zip(ids.tolist(), mask.tolist()) if m)


generator = torch.Generator().manual_seed(0)
train_ids, train_mask, train_labels = make_sentences(1000, generator)
test_ids, test_mask, test_labels = make_sentences(200, generator)
for i in range(3):
    print(train_labels[i].item(), "|", decode(train_ids[i], train_mask[i]))
"""),
    md(r"""
## An embedding-bag classifier with keyword inputs

The model averages the embeddings of the unmasked tokens (an embedding bag, written with
`nn.Embedding` so that every parameter has an exact per-example gradient) and classifies the
average. Like a Hugging Face model it is called as `model(input_ids=..., attention_mask=...)`.
"""),
    code(r"""
class BagOfWords(nn.Module):
    def __init__(self, n_outputs=2, dim=16):
        super().__init__()
        self.embedding = nn.Embedding(len(VOCAB), dim, padding_idx=0)
        self.classifier = nn.Linear(dim, n_outputs)

    def forward(self, input_ids, attention_mask):
        weights = attention_mask / attention_mask.sum(1, keepdim=True)
        bag = (self.embedding(input_ids) * weights[..., None]).sum(1)
        return self.classifier(torch.tanh(bag))


def train(seed, n_outputs=2, epochs=15):
    torch.manual_seed(seed)
    model = BagOfWords(n_outputs)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_labels)).split(50):
            opt.zero_grad()
            out = model(input_ids=train_ids[idx], attention_mask=train_mask[idx])
            if n_outputs == 1:
                loss = F.binary_cross_entropy_with_logits(out[:, 0], train_labels[idx].float())
            else:
                loss = F.cross_entropy(out, train_labels[idx])
            loss.backward()
            opt.step()
    return model.eval()


models = [train(seed) for seed in range(3)]
with torch.no_grad():
    predicted = models[0](input_ids=test_ids, attention_mask=test_mask).argmax(1)
print(f"test accuracy {(predicted == test_labels).float().mean():.3f}")
"""),
    md(r"""
## TRAK with `TextClassificationOutput`

A batch is `(input_ids, attention_mask, labels)`; the task passes the inputs to the model
exactly as the batch gives them, `model(input_ids, attention_mask)` (a `(encoding, labels)` batch
as `model(**encoding)`; `input_keys=(...)` names positional inputs to pass them as keywords).
The math is the classification margin.
"""),
    code(r"""
train_set = TensorDataset(train_ids, train_mask, train_labels)
test_batch = (test_ids, test_mask, test_labels)
task = ci.tasks.TextClassificationOutput()
trak = ci.TRAK(BagOfWords(), train_set, [m.state_dict() for m in models], task=task)
scores = trak.influence(test_batch)
print(tuple(scores.shape))


def show(scores, t, k=3):
    print(f"test ({test_labels[t].item()}): {decode(test_ids[t], test_mask[t])}")
    for kind, order in (("proponent", scores[t].argsort(descending=True)), ("opponent", scores[t].argsort())):
        for i in order[:k].tolist():
            print(f"  {kind} {scores[t, i]:+.2e} ({train_labels[i].item()}): {decode(train_ids[i], train_mask[i])}")


show(scores, t=0)
same = (train_labels[scores.topk(5, dim=1).indices] == test_labels[:, None]).float().mean()
print(f"top-5 proponents with the test label: {same:.3f}")
"""),
    md(r"""
Proponents share the test sentence's sentiment words; opponents use the same words the other
way round.

A tokenizer's output, a dict of tensors, works the same way: a dataset of `(encoding, label)`
pairs (the default collate stacks the dicts), queries `(encoding, labels)`, and the model is
called with `**encoding`. The scores are the same:
"""),
    code(r"""
class EncodedSentences(torch.utils.data.Dataset):
    def __init__(self, input_ids, attention_mask, labels):
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}, self.labels[i]


encoded_train = EncodedSentences(train_ids, train_mask, train_labels)
dict_trak = ci.TRAK(BagOfWords(), encoded_train, [m.state_dict() for m in models], task=task)
dict_scores = dict_trak.influence(({"input_ids": test_ids, "attention_mask": test_mask}, test_labels))
print("same scores from dict batches:", torch.allclose(dict_scores, scores, rtol=1e-4, atol=1e-6))
"""),
    md(r"""
## Which words carry the prediction?

`ci.LayerIntegratedGradients` on the embedding layer attributes the logit of the predicted class
to each token's embedding; summed over the embedding dimension, one number per token. The token ids
are integers, so the path runs through the embeddings, from the padding token's embedding (zero).
"""),
    code(r"""
def logits_of(input_ids, attention_mask):
    return models[0](input_ids=input_ids, attention_mask=attention_mask)


lig = ci.LayerIntegratedGradients(logits_of, models[0].embedding)
rows = slice(0, 3)
token_attr = lig.attribute(
    test_ids[rows], baselines=torch.zeros_like(test_ids[rows]), additional_forward_args=(test_mask[rows],),
    target=predicted[rows], n_steps="auto",
).sum(-1)
print("relative completeness error per sentence:", lig.convergence.relative_error.tolist())
for t in range(3):
    n = int(test_mask[t].sum())
    tokens = [VOCAB[i] for i in test_ids[t, :n].tolist()]
    display(HTML(f"<b>predicted {predicted[t].item()}</b> " + ci.visualization.attributions_to_html(
        tokens, token_attr[t, :n], delta=lig.convergence.delta[t])))
"""),
    md(r"""
## A custom `ModelOutput`: one logit

A binary classifier often returns a single logit $g$ (trained with `BCEWithLogitsLoss`), which
`ClassificationOutput` (a logit per class) does not fit. Its margin is $f = (2y - 1)\,g$, and the
loss is $L = \log(1 + e^{-f})$. A subclass defines `output` (one value per example, written for a
batch so that TRAK can take per-example gradients with `torch.func`) and `loss`; the out-to-loss
gradient $Q = -\partial L / \partial f$ is then found by autograd. Here it should be
$\sigma(-f) = 1 - p_y$:
"""),
    code(r"""
class BinaryLogitOutput(ci.tasks.ModelOutput):
    # f = (2y - 1) g = log(p_y / (1 - p_y)) for a single logit g; L = softplus(-f)

    def output(self, model, batch):
        *inputs, labels = batch
        logit = model(*inputs)[:, 0]
        return (2 * labels - 1) * logit

    def loss(self, model, batch):
        return F.softplus(-self.output(model, batch))


binary_models = [train(seed, n_outputs=1) for seed in range(3)]
binary_task = BinaryLogitOutput()
q = binary_task.out_to_loss_grad(binary_models[0], test_batch)
f = binary_task.output(binary_models[0], test_batch).detach()
print(f"max |Q - sigmoid(-f)| = {(q - torch.sigmoid(-f)).abs().max():.1e}")
assert torch.allclose(q, torch.sigmoid(-f), atol=1e-5)
"""),
    md(r"""
`task=` takes the instance (or the class). The single-logit models give scores that rank the
training sentences much like the two-logit ones:
"""),
    code(r"""
binary_trak = ci.TRAK(BagOfWords(n_outputs=1), train_set, [m.state_dict() for m in binary_models], task=binary_task)
binary_scores = binary_trak.influence(test_batch)
show(binary_scores, t=0)
rho = np.mean([ci.metrics.spearman(binary_scores[t], scores[t]) for t in range(len(test_labels))])
print(f"mean rank correlation with the two-logit TRAK scores: {rho:.3f}")
"""),
    md(r"""
## When to write `out_to_loss_grad` yourself

The autograd fallback checks that the loss depends on the model's outputs through $f$ alone
(otherwise $Q$ is undefined and it says so). When $Q$ has a closed form, defining
`out_to_loss_grad(model, batch)` instead of `loss` saves a backward pass per batch; `prepare(model,
data)` is called once per checkpoint before featurising, for tasks that need statistics of the
training set (as `ContrastiveOutput` does for its negatives).
"""),
]

NOTEBOOKS = {
    "01_data_attribution_digits.ipynb": DATA_ATTRIBUTION,
    "02_logits_or_probabilities.ipynb": LOGITS_OR_PROBABILITIES,
    "03_custom_task_text.ipynb": CUSTOM_TASK_TEXT,
}


def build(name: str, cells: list) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    for i, cell in enumerate(nb.cells):
        cell.id = f"{Path(name).stem[:2]}-cell-{i:02d}"  # stable ids: rebuilding gives the same file
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nbformat.validate(nb)
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(name, cells), HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
