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
# # A custom task: data attribution for a text classifier
#
# TRAK scores rest on a *model output function* $f(z)$ and the out-to-loss gradient
# $Q = -\partial L / \partial f$ that weighs each training example. `ci.tasks` holds them
# (`ModelOutput` subclasses): for classification $f$ is the margin $\log\frac{p_y}{1-p_y}$ and
# $Q = 1 - p_y$.
#
# This tutorial builds a small text classifier on generated sentences, runs TRAK with
# `TextClassificationOutput` (keyword inputs, as a tokenizer produces them), looks at which words
# carry a prediction, and writes a `ModelOutput` subclass for a model the built-in tasks do not
# cover: a binary classifier with a single logit.

# %%
import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import HTML, display
from torch import nn
from torch.utils.data import TensorDataset

import captum_influence as ci

_ = torch.manual_seed(0)
# The models here are tiny: one thread is faster than several handing work back and forth (much
# faster when other programs share the cores).
torch.set_num_threads(1)

# %% [markdown]
# ## Generated sentences
#
# Sentences of 6 to 16 words from a small vocabulary; a sentence is positive when it holds more
# positive than negative words. Token ids are padded to 16 with an attention mask, as a
# tokenizer would return them.

# %%
POSITIVE = ["good", "great", "fine", "excellent"]
NEGATIVE = ["bad", "awful", "poor", "dull"]
NEUTRAL = (
    "the a movie plot actor was is and very really film story scene music ending it this quite director cast"
).split()
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


# %% [markdown]
# ## An embedding-bag classifier with keyword inputs
#
# The model averages the embeddings of the unmasked tokens (an embedding bag, written with
# `nn.Embedding` so that every parameter has an exact per-example gradient) and classifies the
# average. Like a Hugging Face model it is called as `model(input_ids=..., attention_mask=...)`.


# %%
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

# %% [markdown]
# ## TRAK with `TextClassificationOutput`
#
# A batch is `(input_ids, attention_mask, labels)`; the task passes the inputs to the model
# exactly as the batch gives them, `model(input_ids, attention_mask)` (a `(encoding, labels)` batch
# as `model(**encoding)`; `input_keys=(...)` names positional inputs to pass them as keywords).
# The math is the classification margin.

# %%
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


# %% [markdown]
# Proponents share the test sentence's sentiment words; opponents use the same words the other
# way round.
#
# A tokenizer's output, a dict of tensors, works the same way: a dataset of `(encoding, label)`
# pairs (the default collate stacks the dicts), queries `(encoding, labels)`, and the model is
# called with `**encoding`. The scores are the same:


# %%
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


# %% [markdown]
# ## Which words carry the prediction?
#
# `ci.LayerIntegratedGradients` on the embedding layer attributes the logit of the predicted class
# to each token's embedding; summed over the embedding dimension, one number per token. The token ids
# are integers, so the path runs through the embeddings, from the padding token's embedding (zero).


# %%
def logits_of(input_ids, attention_mask):
    return models[0](input_ids=input_ids, attention_mask=attention_mask)


lig = ci.LayerIntegratedGradients(logits_of, models[0].embedding)
rows = slice(0, 3)
token_attr = lig.attribute(
    test_ids[rows],
    baselines=torch.zeros_like(test_ids[rows]),
    additional_forward_args=(test_mask[rows],),
    target=predicted[rows],
    n_steps="auto",
).sum(-1)
print("relative completeness error per sentence:", lig.convergence.relative_error.tolist())
for t in range(3):
    n = int(test_mask[t].sum())
    tokens = [VOCAB[i] for i in test_ids[t, :n].tolist()]
    display(
        HTML(
            f"<b>predicted {predicted[t].item()}</b> "
            + ci.visualization.attributions_to_html(tokens, token_attr[t, :n], delta=lig.convergence.delta[t])
        )
    )


# %% [markdown]
# ## A custom `ModelOutput`: one logit
#
# A binary classifier often returns a single logit $g$ (trained with `BCEWithLogitsLoss`), which
# `ClassificationOutput` (a logit per class) does not fit. Its margin is $f = (2y - 1)\,g$, and the
# loss is $L = \log(1 + e^{-f})$. A subclass defines `output` (one value per example, written for a
# batch so that TRAK can take per-example gradients with `torch.func`) and `loss`; the out-to-loss
# gradient $Q = -\partial L / \partial f$ is then found by autograd. Here it should be
# $\sigma(-f) = 1 - p_y$:


# %%
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

# %% [markdown]
# `task=` takes the instance (or the class). The single-logit models give scores that rank the
# training sentences much like the two-logit ones:

# %%
binary_trak = ci.TRAK(BagOfWords(n_outputs=1), train_set, [m.state_dict() for m in binary_models], task=binary_task)
binary_scores = binary_trak.influence(test_batch)
show(binary_scores, t=0)
rho = np.mean([ci.metrics.spearman(binary_scores[t], scores[t]) for t in range(len(test_labels))])
print(f"mean rank correlation with the two-logit TRAK scores: {rho:.3f}")

# %% [markdown]
# ## When to write `out_to_loss_grad` yourself
#
# The autograd fallback checks that the loss depends on the model's outputs through $f$ alone
# (otherwise $Q$ is undefined and it says so). When $Q$ has a closed form, defining
# `out_to_loss_grad(model, batch)` instead of `loss` saves a backward pass per batch; `prepare(model,
# data)` is called once per checkpoint before featurising, for tasks that need statistics of the
# training set (as `ContrastiveOutput` does for its negatives).
