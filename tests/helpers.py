"""Small models and float64 references shared by the tests.

Every reference here is a loop of single-example autograd calls: row b of a per-example gradient
is ``torch.autograd.grad(fn(model, *inputs[b:b+1]), params)``, the model seeing example b alone.
TRAK and TracIn references are built from those rows by their closed forms.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import Dataset, TensorDataset

Batch = tuple


# --- calling a model on a batch ------------------------------------------------------------


def call(model: nn.Module, inputs: Sequence[Any]) -> Any:
    """``model(**encoding)`` for a single dict input, else ``model(*inputs)``."""
    if len(inputs) == 1 and isinstance(inputs[0], Mapping):
        return model(**inputs[0])
    return model(*inputs)


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, or an object with ``.logits`` (transformers)."""
    return out if isinstance(out, torch.Tensor) else out.logits


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRAK's classification output g_y - logsumexp_{j != y} g_j, one per example."""
    correct = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return correct - others.logsumexp(1)


def margin_fn(model: nn.Module, *batch: Any) -> torch.Tensor:
    """``fn(model, *inputs, labels) -> Tensor[B]``: the margin of the labelled class."""
    return margins(logits_of(call(model, batch[:-1])), batch[-1])


def ce_fn(model: nn.Module, *batch: Any) -> torch.Tensor:
    """``fn(model, *inputs, labels) -> Tensor[B]``: each example's cross-entropy."""
    return F.cross_entropy(logits_of(call(model, batch[:-1])), batch[-1], reduction="none")


def neg_ce_fn(model: nn.Module, *batch: Any) -> torch.Tensor:
    """``fn(model, *inputs, labels) -> Tensor[B]``: each example's log-likelihood, -cross-entropy."""
    return -ce_fn(model, *batch)


def example(batch: Sequence[Any], b: int) -> tuple:
    """Example b of a batch as a batch of one (tensors and dicts of tensors sliced on dim 0)."""
    return tuple(tree_map(lambda x: x[b : b + 1] if isinstance(x, torch.Tensor) else x, tuple(batch)))


def batch_len(batch: Sequence[Any]) -> int:
    """The number of examples: the first dimension of the batch's first tensor."""
    return next(x for x in tree_flatten(tuple(batch))[0] if isinstance(x, torch.Tensor)).shape[0]


# --- the loop references -----------------------------------------------------------------


def param_names(model: nn.Module, params: Optional[Sequence[str]] = None) -> list[str]:
    """Trainable parameter names (deduplicated, as ``named_parameters``), or those equal to or
    under the given names, in model order."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return names
    chosen = [n for n in names if any(n == q or n.startswith(q + ".") for q in params)]
    assert chosen, f"{params} selects no parameter of {names}"
    return chosen


def loop_grads(
    model: nn.Module, fn: Callable[..., torch.Tensor], inputs: Sequence[Any], params: Optional[Sequence[str]] = None
) -> dict[str, torch.Tensor]:
    """``{name: Tensor[B, *shape]}``, row b = d fn(model, *inputs[b:b+1])[0] / d param."""
    table = dict(model.named_parameters())
    names = param_names(model, params)
    wrt = [table[n] for n in names]
    rows = []
    for b in range(batch_len(inputs)):
        out = fn(model, *example(inputs, b))
        assert out.shape == (1,), f"fn returned shape {tuple(out.shape)} for one example"
        rows.append(torch.autograd.grad(out[0], wrt, allow_unused=True))
    return {
        name: torch.stack([r[i] if r[i] is not None else torch.zeros_like(wrt[i]) for r in rows])
        for i, name in enumerate(names)
    }


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example gradients flattened and concatenated in dict order: (B, P)."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def flat_params(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one flat vector, in ``named_parameters`` order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def unflat(model: nn.Module, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    """A flat parameter vector back as ``{name: tensor}`` (for ``functional_call``)."""
    out, offset = {}, 0
    for name, p in model.named_parameters():
        out[name] = vector[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    return out


def classification_q(model: nn.Module, batch: Sequence[Any]) -> torch.Tensor:
    """Q_i = 1 - p_{y_i}, each example alone."""
    with torch.no_grad():
        rows = []
        for b in range(batch_len(batch)):
            one = example(batch, b)
            rows.append(1 - logits_of(call(model, one[:-1])).softmax(1)[0, one[-1][0]])
    return torch.stack(rows).double()


def trak_reference(
    model: nn.Module,
    train: Batch,
    test: Batch,
    damping: float,
    *,
    output_fn: Callable[..., torch.Tensor] = margin_fn,
    q_fn: Callable[[nn.Module, Batch], torch.Tensor] = classification_q,
    params: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """One checkpoint, no projection: phi_test (Phi^T Phi + lambda I)^{-1} Phi^T diag(Q), (n_test, n_train).

    Computed as phi_test Phi^T (Phi Phi^T + lambda I)^{-1} diag(Q), the same matrix (push-through
    identity) with an n_train x n_train solve, so that models with many parameters stay cheap."""
    phi = flat(loop_grads(model, output_fn, train, params)).double()
    phi_test = flat(loop_grads(model, output_fn, test, params)).double()
    kernel = phi @ phi.T + damping * torch.eye(phi.shape[0], dtype=torch.float64)
    return (phi_test @ phi.T) @ torch.linalg.inv(kernel) * q_fn(model, train).double()[None, :]


def tracin_reference(
    model: nn.Module,
    train: Batch,
    test: Batch,
    *,
    loss_fn: Callable[..., torch.Tensor] = ce_fn,
    params: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """One checkpoint of weight 1: <grad loss(test), grad loss(train)>, (n_test, n_train)."""
    train_grads = flat(loop_grads(model, loss_fn, train, params)).double()
    return flat(loop_grads(model, loss_fn, test, params)).double() @ train_grads.T


# --- comparisons -------------------------------------------------------------------------


def assert_grads_equal(ours: dict, reference: dict, rtol: float = 1e-9) -> None:
    """Same names in the same order, same shapes, and every entry within rtol of the parameter's
    largest reference entry (floored at rtol times the largest entry of any parameter)."""
    assert list(ours) == list(reference), f"names differ: {list(ours)} vs {list(reference)}"
    overall = max(float(g.abs().max()) for g in reference.values())
    bad = {}
    for name, ref in reference.items():
        got = ours[name]
        assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
        scale = max(float(ref.abs().max()), 1e-3 * overall, torch.finfo(torch.float64).tiny)
        error = float((got.double() - ref.double()).abs().max()) / scale
        if not error <= rtol:
            bad[name] = f"{error:.1e}"
    assert not bad, f"relative errors above {rtol:.0e}: {bad}"


def assert_scores_close(ours: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-5) -> None:
    assert ours.shape == reference.shape, f"shape {tuple(ours.shape)} vs {tuple(reference.shape)}"
    error = float((ours.double() - reference.double()).abs().max() / reference.double().abs().max())
    assert error <= rtol, f"relative error {error:.2e} > {rtol:.0e}"


def user_warnings(record: Sequence[Any]) -> list[str]:
    """The messages of the UserWarnings (and subclasses) in a ``warnings.catch_warnings`` record."""
    return [str(w.message) for w in record if issubclass(w.category, UserWarning)]


def modes(model: nn.Module) -> dict[str, bool]:
    """Every module's ``training`` flag, by path."""
    return {path: module.training for path, module in model.named_modules()}


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Examples(Dataset):
    """A list of examples ``(inputs..., label)`` as a Dataset (the default collate stacks dicts)."""

    def __init__(self, items: Sequence[tuple]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple:
        return self.items[index]


def as_examples(batch: Batch) -> Examples:
    """The examples of a batch (tensors or a dict encoding before the labels) as a Dataset."""
    return Examples([tuple(tree_map(lambda x: x[b], tuple(batch))) for b in range(batch_len(batch))])


def line_of(function: Callable, text: str) -> int:
    """The source line number of the first line of ``function`` containing ``text``."""
    lines, start = inspect.getsourcelines(function)
    return start + next(i for i, line in enumerate(lines) if text in line)


# --- small models ------------------------------------------------------------------------


def checkpointed_classifier(
    *hidden: nn.Module, learning_rates: Optional[Sequence[float]] = None, data_seed: int = 1
) -> tuple[nn.Sequential, list[dict], TensorDataset, Batch]:
    """``(model, checkpoints, train, test)``: ``Linear(6, 10), *hidden, Linear(10, 3)`` (hidden:
    Tanh unless given), seeded; two checkpoints, the initial weights and those after a random step
    of scale 0.3; 42 training examples (6 batches of 8, the last short) and 5 test examples, drawn
    from a generator seeded with ``data_seed``. With ``learning_rates``, checkpoint c is its state
    dict plus ``"lr": learning_rates[c]``, to load with :func:`load_with_lr`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), *(hidden or (nn.Tanh(),)), nn.Linear(10, 3))
    checkpoints: list[dict] = []
    for c in range(2):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        checkpoints.append(state if learning_rates is None else {"lr": learning_rates[c], **state})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(data_seed)
    train = TensorDataset(torch.randn(42, 6, generator=g), torch.randint(0, 3, (42,), generator=g))
    test = (torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g))
    return model, checkpoints, train, test


def load_with_lr(model: nn.Module, checkpoint: dict) -> float:
    """``checkpoints_load_func`` for :func:`checkpointed_classifier`'s checkpoints with learning rates."""
    model.load_state_dict({k: v for k, v in checkpoint.items() if k != "lr"})
    return checkpoint["lr"]


class BatchMaxNet(nn.Module):
    """Doubles the hidden layer when any input of the batch sums above ``threshold``: a batched
    forward computes another function of each example than the example alone."""

    def __init__(self, d: int = 4, hidden: int = 6, classes: int = 3, threshold: float = 1.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, classes)
        self.threshold = threshold

    def forward(self, x):
        h = self.fc1(x)
        if x.sum(1).max() > self.threshold:
            h = h * 2
        return self.fc2(torch.tanh(h))


class BatchMeanNet(nn.Module):
    """Adds the deviation from the batch mean of the hidden layer (zero for an example alone)."""

    def __init__(self, d: int = 4, hidden: int = 6, classes: int = 3):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.tanh(h + (h - h.mean(0, keepdim=True))))


class DropoutNet(nn.Module):
    def __init__(self, d: int = 4, hidden: int = 6, classes: int = 3):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, classes)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


class KeywordLinear(nn.Module):
    """Linear layers called with a keyword argument: the input is not among a hook's ``args``."""

    def __init__(self, d: int = 4, hidden: int = 6, classes: int = 3):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(input=torch.tanh(self.fc1(input=x)))


class PositionNet(nn.Module):
    """Token embeddings (B, L, H) plus position embeddings of ids (1, L), broadcast over the batch,
    as BERT and GPT-2 do."""

    def __init__(self, vocab: int = 11, length: int = 5, dim: int = 6, classes: int = 3):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(length, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        h = self.tokens(ids) + self.positions(positions)
        return self.head(torch.tanh(self.norm(h)).mean(1))


class TiedNet(nn.Module):
    """An Embedding and a Linear head sharing one weight; the classes are the vocabulary."""

    def __init__(self, vocab: int = 7, dim: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))).mean(1))


class TwiceNet(nn.Module):
    """``mix`` is called twice in one forward."""

    def __init__(self, d: int = 4, hidden: int = 6, classes: int = 3):
        super().__init__()
        self.fc_in, self.mix, self.out = nn.Linear(d, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.tanh(self.fc_in(x))
        h = torch.tanh(self.mix(h))
        return self.out(torch.tanh(self.mix(h)) + h)


class LSTMNet(nn.Module):
    """An nn.LSTM over a sequence (B, T, d), which has no per-layer gradient rule."""

    def __init__(self, d: int = 3, hidden: int = 4, classes: int = 3):
        super().__init__()
        self.lstm = nn.LSTM(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class RowGate(nn.Module):
    """Scales each row whose sum is positive by a learned vector, deciding row by row in Python
    (``.item()``): the same per example alone or in a batch, but torch.func.vmap cannot run it,
    and no hook rule covers the custom module's parameter."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, width))

    def forward(self, h):
        return torch.stack([row * self.scale if row.sum().item() > 0 else row for row in h])


class GatedNet(nn.Module):
    def __init__(self, d: int = 4, hidden: int = 6, classes: int = 3):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, classes)
        self.gate = RowGate(hidden)

    def forward(self, x):
        return self.fc2(torch.tanh(self.gate(self.fc1(x))))


def tiny_bert(seed: int = 0) -> nn.Module:
    """A transformers BertForSequenceClassification from a small config (vocab 100, hidden 32, 2
    layers, 3 labels), random weights, nothing downloaded, in eval mode; skips without transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


def tiny_gpt2_classifier(vocab_size: int = 100, seed: int = 0) -> nn.Module:
    """A transformers GPT2ForSequenceClassification from a small config (width 32, 2 layers, 3
    labels, token 0 as its pad, begin and end), random weights, in eval mode; skips without transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        num_labels=3,
    )
    return transformers.GPT2ForSequenceClassification(config).eval()
