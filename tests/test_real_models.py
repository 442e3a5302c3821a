"""TRAK, TracIn, per-example gradients and layer Integrated Gradients on real transformers models.

Tiny BERT, GPT-2 and ViT built from configs with random weights (nothing downloaded), in float64
and eval mode, with the library's default attention implementation (sdpa). Every number is
checked against a loop of single-example autograd calls (``helpers``) or against Captum.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    as_examples,
    assert_grads_equal,
    assert_scores_close,
    loop_grads,
    margin_fn,
    state_of,
    tiny_bert,
    tracin_reference,
    trak_reference,
    user_warnings,
)
from torch import nn
from torch.utils.data import TensorDataset

import captum_influence as ci
from captum_influence._backend import LayerGrads

transformers = pytest.importorskip("transformers")

N_TRAIN, N_TEST, BATCH, LENGTH = 12, 4, 8, 8
DAMPING = 0.1
GRAD_RTOL = 1e-8


# --- BERT ------------------------------------------------------------------------------------


def bert_model(seed=0):
    return tiny_bert(seed).double()


def bert_batch(n, seed):
    """``(input_ids, attention_mask, token_type_ids, labels)``, BERT's positional order: padded
    tails (mask 0, id 0) and a second segment (token type 1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (n,), generator=g)
    lengths[0] = LENGTH // 2  # at least one padded example
    positions = torch.arange(LENGTH)[None, :]
    mask = (positions < lengths[:, None]).long()
    ids = torch.randint(1, 100, (n, LENGTH), generator=g) * mask
    token_types = ((positions >= lengths[:, None] // 2) & (mask == 1)).long()
    return ids, mask, token_types, torch.randint(0, 3, (n,), generator=g)


def as_encoding(batch):
    """The same batch as ``(encoding, labels)``, as a tokenizer gives it."""
    ids, mask, token_types, labels = batch
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": token_types}, labels


# Parameters TRAK differentiates without projection (its Gram matrix is parameters x parameters):
# the broadcast position embeddings, the token types, a LayerNorm and the classifier.
BERT_TRAK_LAYERS = [
    "bert.embeddings.position_embeddings",
    "bert.embeddings.token_type_embeddings",
    "bert.encoder.layer.1.output.LayerNorm",
    "classifier",
]


# --- GPT-2 -----------------------------------------------------------------------------------


def gpt2_model(seed=0, tied=True):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tied,
    )
    return transformers.GPT2LMHeadModel(config).double().eval()


def gpt2_batch(n, seed):
    """``(input_ids, labels)`` with labels = input_ids: each position predicts the next token."""
    ids = torch.randint(0, 64, (n, LENGTH), generator=torch.Generator().manual_seed(seed))
    return ids, ids.clone()


def next_token_losses(logits, labels):
    """Each sequence's mean next-token cross-entropy: Tensor[B]."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none").mean(1)


def gpt2_output_fn(model, ids, labels):
    return -next_token_losses(model(ids).logits, labels)


def gpt2_loss_fn(model, ids, labels):
    return next_token_losses(model(ids).logits, labels)


class NextTokenOutput(ci.tasks.ModelOutput):
    """f = minus the mean next-token cross-entropy, L = that cross-entropy: Q = -dL/df = 1, left
    to the autograd default of ``out_to_loss_grad``."""

    def output(self, model, batch):
        return gpt2_output_fn(model, *batch)

    def loss(self, model, batch):
        return gpt2_loss_fn(model, *batch)


GPT2_TRAK_LAYERS = ["transformer.wpe", "transformer.h.1.attn.c_proj", "transformer.ln_f"]


# --- ViT -------------------------------------------------------------------------------------


def vit_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config).double().eval()


def vit_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


VIT_TRAK_LAYERS = ["vit.embeddings", "vit.layernorm", "classifier"]

# name: (model, batch maker, per-example function)
MODELS = {
    "bert": (bert_model, bert_batch, margin_fn),
    "gpt2": (gpt2_model, gpt2_batch, gpt2_output_fn),
    "vit": (vit_model, vit_batch, margin_fn),
}


def setup(name):
    make_model, make_batch, fn = MODELS[name]
    return make_model(), make_batch(N_TRAIN, 1), make_batch(N_TEST, 2), fn


# --- per-example gradients ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_per_example_grads_equal_the_loop(name):
    model, train, _, fn = setup(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a loop fallback may warn; the numbers must be exact
        ours = ci.per_example_grads(model, fn, train, chunk_size=5)
    assert_grads_equal(ours, loop_grads(model, fn, train), GRAD_RTOL)


@pytest.mark.parametrize("name", list(MODELS))
def test_layer_grads_equal_the_loop(name):
    model, train, _, fn = setup(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = LayerGrads(model).grads(fn, train, chunk_size=5)
    assert_grads_equal(ours, loop_grads(model, fn, train), GRAD_RTOL)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_layer_has_a_hook_rule(name):
    """Linear, Embedding (position ids broadcast over the batch), LayerNorm, GPT-2's Conv1D, and
    ViT's patch Conv2d, class token and learned positions: no fallback, no warning."""
    model, train, _, fn = setup(name)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ours = LayerGrads(model, fallback="error").grads(fn, train)
    assert user_warnings(record) == []
    assert_grads_equal(ours, loop_grads(model, fn, train), GRAD_RTOL)


# --- BERT: batch forms, tasks and loss functions --------------------------------------------


@pytest.mark.parametrize(
    "form, task",
    [("tuple", "classification"), ("tuple", "text_classification"), ("dict", "text_classification")],
)
def test_bert_trak_equals_the_loop_reference(form, task):
    model, train, test, _ = setup("bert")
    reference = trak_reference(model, train, test, DAMPING, params=BERT_TRAK_LAYERS)
    if form == "dict":
        train, test = as_encoding(train), as_encoding(test)
    trak = ci.TRAK(
        model,
        as_examples(train),
        [state_of(model)],
        projection_dim=None,
        damping=DAMPING,
        layers=BERT_TRAK_LAYERS,
        batch_size=BATCH,
        task=task,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_scores_close(trak.influence(test), reference)


class LogitsCrossEntropy(nn.Module):
    """Cross-entropy of a model output's ``.logits``, one value per example."""

    reduction = "none"

    def forward(self, out, labels):
        return F.cross_entropy(out.logits, labels, reduction="none")


LOSS_FNS = {
    "lambda": lambda out, labels: F.cross_entropy(out.logits, labels, reduction="none"),
    "module": LogitsCrossEntropy(),
    "default": None,
}


@pytest.mark.parametrize("loss", list(LOSS_FNS))
@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_bert_tracincp_equals_the_loop_reference(form, loss):
    model, train, test, _ = setup("bert")
    reference = tracin_reference(model, train, test)
    if form == "dict":
        train, test = as_encoding(train), as_encoding(test)
    tracin = ci.TracInCP(
        model, as_examples(train), [state_of(model)], layers=None, batch_size=BATCH, loss_fn=LOSS_FNS[loss]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_scores_close(tracin.influence(test), reference)


@pytest.mark.parametrize("loss", ["lambda", "default"])
def test_bert_tracincp_fast_equals_the_loop_reference(loss):
    model, train, test, _ = setup("bert")
    reference = tracin_reference(model, train, test, params=["classifier"])
    fast = ci.TracInCPFast(
        model, model.classifier, as_examples(train), [state_of(model)], batch_size=BATCH, loss_fn=LOSS_FNS[loss]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_scores_close(fast.influence(test), reference)


def test_bert_layer_integrated_gradients_equal_captum_and_meet_completeness():
    from captum.attr import LayerIntegratedGradients as CaptumLIG

    model, batch, _, _ = setup("bert")
    ids, mask, token_types, labels = (t[:4] for t in batch)

    def forward(input_ids, attention_mask, token_type_ids):
        return model(input_ids, attention_mask, token_type_ids).logits

    layer = model.bert.embeddings.word_embeddings
    settings = dict(
        baselines=torch.zeros_like(ids),
        target=labels,
        additional_forward_args=(mask, token_types),
        n_steps=24,
        method="gausslegendre",
        return_convergence_delta=True,
    )
    ours, delta = ci.LayerIntegratedGradients(forward, layer).attribute(ids, **settings)
    theirs, their_delta = CaptumLIG(forward, layer).attribute(ids, **settings)
    with torch.no_grad():
        change = forward(ids, mask, token_types) - forward(torch.zeros_like(ids), mask, token_types)
        change = change.gather(1, labels[:, None])[:, 0]
    assert ours.shape == theirs.shape == (4, LENGTH, 32)
    assert_scores_close(ours, theirs, 1e-7)  # Captum rounds the quadrature weights to float32
    assert (delta - their_delta).abs().max() <= 1e-7 * change.abs().max()
    # Completeness: the attributions sum to F(x) - F(x') up to the quadrature error delta.
    assert torch.allclose(ours.sum((1, 2)), change, rtol=1e-3, atol=1e-6)
    assert (delta.abs() <= 1e-3 * change.abs() + 1e-6).all()


# --- GPT-2 -----------------------------------------------------------------------------------


def test_gpt2_trak_with_a_custom_task_equals_the_loop_reference():
    model, train, test, _ = setup("gpt2")
    reference = trak_reference(
        model,
        train,
        test,
        DAMPING,
        output_fn=gpt2_output_fn,
        q_fn=lambda m, batch: torch.ones(len(batch[-1])),
        params=GPT2_TRAK_LAYERS,
    )
    trak = ci.TRAK(
        model,
        TensorDataset(*train),
        [state_of(model)],
        projection_dim=None,
        damping=DAMPING,
        layers=GPT2_TRAK_LAYERS,
        batch_size=BATCH,
        task=NextTokenOutput(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_scores_close(trak.influence(test), reference)


def test_gpt2_tracincp_equals_the_loop_reference():
    """Every parameter, the tied embedding / lm_head weight among them."""
    model, train, test, _ = setup("gpt2")
    reference = tracin_reference(model, train, test, loss_fn=gpt2_loss_fn)
    tracin = ci.TracInCP(
        model,
        TensorDataset(*train),
        [state_of(model)],
        layers=None,
        batch_size=BATCH,
        loss_fn=lambda out, labels: next_token_losses(out.logits, labels),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_scores_close(tracin.influence(test), reference)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt2_tracincp_fast_on_the_lm_head_equals_the_loop_reference(tied):
    """Tied to the token embedding, the lm_head's weight is one parameter with the embedding:
    its gradient (the reference) has an embedding part that the head's inputs and output
    gradients alone would miss."""
    model = gpt2_model(tied=tied)
    train, test = gpt2_batch(N_TRAIN, 1), gpt2_batch(N_TEST, 2)
    head_weight = "transformer.wte" if tied else "lm_head"  # as named_parameters() lists it
    reference = tracin_reference(model, train, test, loss_fn=gpt2_loss_fn, params=[head_weight])
    fast = ci.TracInCPFast(
        model,
        model.lm_head,
        TensorDataset(*train),
        [state_of(model)],
        batch_size=BATCH,
        loss_fn=lambda out, labels: next_token_losses(out.logits, labels),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_scores_close(fast.influence(test), reference)


# --- ViT -------------------------------------------------------------------------------------


def test_vit_trak_equals_the_loop_reference():
    model, train, test, _ = setup("vit")
    reference = trak_reference(model, train, test, DAMPING, params=VIT_TRAK_LAYERS)
    trak = ci.TRAK(
        model,
        TensorDataset(*train),
        [state_of(model)],
        projection_dim=None,
        damping=DAMPING,
        layers=VIT_TRAK_LAYERS,
        batch_size=BATCH,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_scores_close(trak.influence(test), reference)


@pytest.mark.parametrize("fast", [False, True], ids=["TracInCP", "TracInCPFast"])
def test_vit_tracin_equals_the_loop_reference(fast):
    model, train, test, _ = setup("vit")
    loss = LOSS_FNS["lambda"]
    if fast:
        reference = tracin_reference(model, train, test, params=["classifier"])
        tracin = ci.TracInCPFast(
            model, model.classifier, TensorDataset(*train), [state_of(model)], batch_size=BATCH, loss_fn=loss
        )
    else:
        reference = tracin_reference(model, train, test)
        tracin = ci.TracInCP(model, TensorDataset(*train), [state_of(model)], batch_size=BATCH, loss_fn=loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_scores_close(tracin.influence(test), reference)
