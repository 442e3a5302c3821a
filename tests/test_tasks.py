import types

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_bert
from torch import nn
from torch.utils._pytree import tree_map

import captum_influence as ci
from captum_influence.tasks import (
    ClassificationOutput,
    ContrastiveOutput,
    ModelOutput,
    RegressionOutput,
    TextClassificationOutput,
    get_task,
)


class Given(nn.Module):
    """A 'model' whose input is its logits, for closed-form checks at any logits."""

    def forward(self, g):
        return g


def mlp(classes=4):
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, classes))


def loop_grads(model, fn, batch):
    """Reference per-example gradients: one autograd call per example."""
    names, params = zip(*model.named_parameters())
    n = batch[-1].shape[0]
    rows = []
    for b in range(n):
        one = tree_map(lambda t: t[b : b + 1] if isinstance(t, torch.Tensor) else t, tuple(batch))
        rows.append(torch.autograd.grad(fn(model, *one)[0], params, allow_unused=True))
    return {
        name: torch.stack([r[i] if r[i] is not None else torch.zeros_like(params[i]) for r in rows])
        for i, name in enumerate(names)
    }


def assert_per_example_grads_match(task, model, batch):
    fn = lambda m, *b: task.output(m, b)  # noqa: E731
    got = ci.per_example_grads(model, fn, tuple(batch), fallback="error")
    want = loop_grads(model, fn, batch)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("classes", [2, 10])
def test_margin_is_log_odds_in_float64(classes):
    g = 3 * torch.randn(16, classes)
    y = torch.randint(0, classes, (16,))
    p = torch.softmax(g.double(), 1).gather(1, y[:, None]).squeeze(1)
    got = ClassificationOutput().output(Given(), (g, y))
    torch.testing.assert_close(got.double(), torch.log(p / (1 - p)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("classes", [2, 10])
def test_out_to_loss_grad_is_minus_dce_dmargin(classes):
    g = (3 * torch.randn(16, classes, dtype=torch.float64)).requires_grad_(True)
    y = torch.randint(0, classes, (16,))
    margin = ClassificationOutput().output(Given(), (g, y))
    ce = F.cross_entropy(g, y, reduction="none")
    # Along g_y alone, d margin = d g_y (the rivals' logsumexp leaves g_y out), so dCE/dmargin is a ratio.
    dmargin = torch.autograd.grad(margin.sum(), g)[0].gather(1, y[:, None]).squeeze(1)
    dce = torch.autograd.grad(ce.sum(), g)[0].gather(1, y[:, None]).squeeze(1)
    dce_dmargin = dce / dmargin
    assert (dce_dmargin < 0).all()  # more margin, less loss
    q = ClassificationOutput().out_to_loss_grad(Given(), (g.detach(), y))
    torch.testing.assert_close(q, -dce_dmargin)
    p = torch.softmax(g.detach(), 1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(q, 1 - p)
    assert not q.requires_grad


def test_temperature_enters_the_out_to_loss_grad_only():
    g, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 5, (8,))
    hot, cold = ClassificationOutput(temperature=2.0), ClassificationOutput()
    torch.testing.assert_close(hot.output(Given(), (g, y)), cold.output(Given(), (g, y)))
    p = torch.softmax(g / 2.0, 1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(hot.out_to_loss_grad(Given(), (g, y)), 1 - p)


def test_autograd_fallback_equals_the_analytic_form_for_classification():
    model = mlp()
    batch = (torch.randn(10, 6), torch.randint(0, 4, (10,)))
    task = ClassificationOutput()
    analytic = task.out_to_loss_grad(model, batch)
    torch.testing.assert_close(ModelOutput.out_to_loss_grad(task, model, batch), analytic, atol=1e-6, rtol=1e-5)

    class MarginWithLoss(ModelOutput):  # defines only output and loss
        def output(self, model, batch):
            return task.output(model, batch)

        def loss(self, model, batch):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    torch.testing.assert_close(MarginWithLoss().out_to_loss_grad(model, batch), analytic, atol=1e-6, rtol=1e-5)


def test_regression_out_to_loss_grad():
    model = nn.Linear(6, 1)
    batch = (torch.randn(9, 6), torch.randn(9))
    task = RegressionOutput()
    f = model(batch[0]).squeeze(1)
    torch.testing.assert_close(task.output(model, batch), f)
    q = task.out_to_loss_grad(model, batch)
    torch.testing.assert_close(q, batch[1] - f.detach())  # -d/df (f - y)^2 / 2
    torch.testing.assert_close(ModelOutput.out_to_loss_grad(task, model, batch), q, atol=1e-6, rtol=1e-5)


def test_autograd_fallback_needs_a_loss_of_the_output():
    class OutputOnly(ModelOutput):
        def output(self, model, batch):
            return model(batch[0])[:, 0]

    batch = (torch.randn(4, 6), torch.randint(0, 4, (4,)))
    with pytest.raises(TypeError, match="task: OutputOnly defines neither out_to_loss_grad"):
        OutputOnly().out_to_loss_grad(mlp(), batch)

    class Unrelated(OutputOnly):
        def loss(self, model, batch):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    with pytest.raises(ValueError, match="task: Unrelated.loss is not a function of its output f"):
        Unrelated().out_to_loss_grad(mlp(), batch)


@pytest.mark.parametrize("classes", [2, 1000])
def test_stable_at_extreme_logits(classes):
    g = 1e4 * (2 * torch.rand(6, classes) - 1)
    y = torch.randint(0, classes, (6,))
    y[0], y[1] = g[0].argmax(), g[1].argmin()
    g[0, y[0]] = g[0].topk(2).values[1] + 50  # 1 - p_y < 2e-22: 0 in float32, but Q must not be
    task = ClassificationOutput()
    x = g.clone().requires_grad_(True)
    margin = task.output(Given(), (x, y))
    (grad,) = torch.autograd.grad(margin.sum(), x)
    q = task.out_to_loss_grad(Given(), (g, y))
    assert torch.isfinite(margin).all() and torch.isfinite(grad).all() and torch.isfinite(q).all()

    g64 = g.double().requires_grad_(True)
    others = g64.masked_fill(F.one_hot(y, classes).bool(), float("-inf"))
    margin64 = g64.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(others, 1)
    (grad64,) = torch.autograd.grad(margin64.sum(), g64)
    torch.testing.assert_close(margin.double(), margin64.detach(), rtol=1e-6, atol=1e-2)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(q.double(), torch.sigmoid(-margin64.detach()), rtol=5e-3, atol=1e-30)
    assert 0 < q[0] < 1e-21 and q[1] == 1.0


def test_per_example_grads_of_classification_and_regression_outputs():
    x = torch.randn(7, 6)
    assert_per_example_grads_match(ClassificationOutput(), mlp(), (x, torch.randint(0, 4, (7,))))
    assert_per_example_grads_match(RegressionOutput(), mlp(1), (x, torch.randn(7)))


class TextModel(nn.Module):
    """Embedding, masked mean pooling, linear head; returns an object with .logits like transformers."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(20, 8)
        self.types = nn.Embedding(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.tokens(input_ids)
        if token_type_ids is not None:
            h = h + self.types(token_type_ids)
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return types.SimpleNamespace(logits=self.head((h * mask).sum(1) / mask.sum(1)))


def text_batch(n=6, length=5):
    ids = torch.randint(0, 20, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[:, 3:] = torch.randint(0, 2, (n, 2))
    kinds = torch.randint(0, 2, (n, length))
    return ids, kinds, mask, torch.randint(0, 3, (n,))


def test_text_classification_inputs_with_and_without_token_type_ids():
    model = TextModel()
    ids, kinds, mask, y = text_batch()
    task = TextClassificationOutput()
    named = TextClassificationOutput(input_keys=("input_ids", "token_type_ids", "attention_mask"))
    for task_, batch, logits in (
        (
            task,
            ({"input_ids": ids, "token_type_ids": kinds, "attention_mask": mask}, y),
            model(ids, mask, kinds).logits,
        ),
        (task, (ids, mask, kinds, y), model(ids, mask, kinds).logits),  # positional, in the batch's order
        (task, (ids, mask, y), model(ids, mask).logits),
        (task, ({"input_ids": ids, "attention_mask": mask}, y), model(ids, mask).logits),
        (named, (ids, kinds, mask, y), model(ids, mask, kinds).logits),  # named, so passed as keywords
    ):
        torch.testing.assert_close(task_.output(model, batch), ClassificationOutput().output(Given(), (logits, y)))
        torch.testing.assert_close(
            task_.out_to_loss_grad(model, batch), ClassificationOutput().out_to_loss_grad(Given(), (logits, y))
        )
    chosen = TextClassificationOutput(input_keys=("input_ids", "attention_mask"))
    encoding = {"input_ids": ids, "token_type_ids": kinds, "attention_mask": mask}
    torch.testing.assert_close(chosen.output(model, (encoding, y)), task.output(model, (ids, mask, y)))
    assert_per_example_grads_match(task, model, (encoding, y))
    assert_per_example_grads_match(task, model, (ids, mask, y))
    assert_per_example_grads_match(named, model, (ids, kinds, mask, y))


def bert_batch(n=5, length=8):
    """BERT's forward order: input_ids, attention_mask, token_type_ids; then labels."""
    ids = torch.randint(1, 100, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1:, 6:] = 0
    mask[3, 4:] = 0
    kinds = torch.zeros(n, length, dtype=torch.long)
    kinds[:, 3:] = 1
    return ids, mask, kinds, torch.tensor([0, 2, 1, 1, 0])


def margin_by_hand(logits, labels):
    """g_y - logsumexp_{j != y} g_j in float64."""
    g = logits.double()
    rivals = g.masked_fill(F.one_hot(labels, g.shape[1]).bool(), float("-inf"))
    return g.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(rivals, 1)


def test_text_classification_passes_bert_inputs_as_the_batch_gives_them():
    bert = tiny_bert()
    ids, mask, kinds, y = bert_batch()
    with torch.no_grad():
        logits = bert(ids, mask, kinds).logits
        reordered = bert(input_ids=ids, token_type_ids=mask, attention_mask=kinds).logits
    want = margin_by_hand(logits, y)
    assert not torch.allclose(margin_by_hand(reordered, y), want, atol=1e-3)  # a reorder would show
    encoding = {"input_ids": ids, "attention_mask": mask, "token_type_ids": kinds}
    for task, batch in (
        (TextClassificationOutput(), (ids, mask, kinds, y)),
        (TextClassificationOutput(), (encoding, y)),
        (TextClassificationOutput(input_keys=("input_ids", "token_type_ids", "attention_mask")), (ids, kinds, mask, y)),
        (TextClassificationOutput(input_keys=("input_ids", "attention_mask", "token_type_ids")), (encoding, y)),
    ):
        with torch.no_grad():
            torch.testing.assert_close(task.output(bert, batch).double(), want, atol=1e-5, rtol=1e-5)
        p = torch.softmax(logits.double(), 1).gather(1, y[:, None]).squeeze(1)
        torch.testing.assert_close(task.out_to_loss_grad(bert, batch).double(), 1 - p, atol=1e-5, rtol=1e-5)


class TinyClip(nn.Module):
    """open_clip's interface: forward(image, text) -> (image_features, text_features, logit_scale.exp())."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(6, 5)
        self.text = nn.Embedding(20, 5)
        self.logit_scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, image, text):
        u = F.normalize(self.image(image), dim=-1)
        v = F.normalize(self.text(text).mean(1), dim=-1)
        return u, v, self.logit_scale.exp()


def clip_batches(n=4, size=5):
    return [(torch.randn(size, 6), torch.randint(0, 20, (size, 3))) for _ in range(n)]


def test_contrastive_output_matches_trak_clip_output():
    from trak.modelout_functions import CLIPModelOutput

    model = TinyClip()
    batches = clip_batches()
    task = ContrastiveOutput(n_negatives=12)
    task.prepare(model, batches)
    images, texts = task.negatives
    assert images.shape == (12, 5)
    # traker samples its negatives with weights arange(N): row 0 never; so a dummy row 0 and N - 1
    # samples give it exactly our negatives (in some order, which logsumexp ignores).
    peer = CLIPModelOutput(simulated_batch_size=12)
    CLIPModelOutput.image_embeddings = torch.cat([torch.zeros(1, 5), images])
    CLIPModelOutput.text_embeddings = torch.cat([torch.zeros(1, 5), texts])
    CLIPModelOutput.num_computed_embeddings = 13
    weights, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    image, text = batches[0]
    want = torch.stack([peer.get_output(model, weights, buffers, image[i], text[i]) for i in range(5)])
    torch.testing.assert_close(task.output(model, (image, text)), want.detach())


def test_contrastive_out_to_loss_grad_in_float64():
    model = TinyClip().double()
    batches = [(x.double(), t) for x, t in clip_batches()]
    for temperature in (None, 0.5):
        task = ContrastiveOutput(temperature, n_negatives=8)
        task.prepare(model, batches)
        image, text = batches[1]
        u, v, scale = model(image, text)
        s = scale if temperature is None else 1 / temperature
        images, texts = task.negatives
        i2t = torch.softmax(s * torch.cat([(u * v).sum(1, keepdim=True), u @ texts.T], 1), 1)[:, 0]
        t2i = torch.softmax(s * torch.cat([(u * v).sum(1, keepdim=True), v @ images.T], 1), 1)[:, 0]
        torch.testing.assert_close(task.out_to_loss_grad(model, (image, text)), (1 - (i2t + t2i) / 2).detach())


def test_contrastive_per_example_grads_and_fixed_negatives():
    model = TinyClip()
    negatives = (F.normalize(torch.randn(10, 5), dim=1), F.normalize(torch.randn(10, 5), dim=1))
    task = ContrastiveOutput(negatives=negatives)
    task.prepare(model, clip_batches())  # fixed negatives stay
    assert torch.equal(task.negatives[0], negatives[0])
    image, text = clip_batches(1)[0]
    fn = lambda m, *b: task.output(m, b)  # noqa: E731
    got = ci.per_example_grads(model, fn, (image, text), fallback="error")
    for b in range(5):
        want = torch.autograd.grad(fn(model, image[b : b + 1], text[b : b + 1])[0], model.image.weight)[0]
        torch.testing.assert_close(got["image.weight"][b], want, atol=1e-6, rtol=1e-5)


def test_contrastive_needs_negatives_and_pairs():
    model = TinyClip()
    image, text = clip_batches(1)[0]
    with pytest.raises(ValueError, match=r"task: ContrastiveOutput has no negatives; call task.prepare"):
        ContrastiveOutput().output(model, (image, text))
    with pytest.raises(ValueError, match=r"batch: ContrastiveOutput expects \(images, texts\); got tuple of length 3"):
        ContrastiveOutput().output(model, (image, text, text))
    with pytest.raises(ValueError, match="negatives: expected"):
        ContrastiveOutput(negatives=(torch.randn(3, 5), torch.randn(4, 5)))


def test_get_task():
    assert isinstance(get_task("classification"), ClassificationOutput)
    assert isinstance(get_task("text_classification"), TextClassificationOutput)
    assert isinstance(get_task("contrastive"), ContrastiveOutput)
    assert isinstance(get_task("regression"), RegressionOutput)
    assert isinstance(get_task(RegressionOutput), RegressionOutput)
    task = ClassificationOutput(temperature=3.0)
    assert get_task(task) is task
    with pytest.raises(
        ValueError, match="task: expected a ModelOutput instance or subclass, or one of 'classification'.*got 'image'"
    ):
        get_task("image")
    with pytest.raises(TypeError, match="task: expected a ModelOutput .* got 3"):
        get_task(3)
    assert ci.tasks.ClassificationOutput is ClassificationOutput


def test_bad_classification_inputs():
    task = ClassificationOutput()
    with pytest.raises(
        ValueError,
        match=r"batch: labels must be class indices, an integer Tensor of shape \(4,\); got dtype torch.float32",
    ):
        task.output(Given(), (torch.randn(4, 3), torch.rand(4)))
    with pytest.raises(
        ValueError,
        match=r"model: ClassificationOutput needs logits of shape \(batch, classes\) "
        r"with at least 2 classes; got \(4, 1\)",
    ):
        task.output(Given(), (torch.randn(4, 1), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="temperature: expected a positive float; got 0"):
        ClassificationOutput(temperature=0)
    with pytest.raises(ValueError, match="batch: expected a tuple"):
        task.output(Given(), torch.randn(4, 3))
    ids, kinds, mask, y = text_batch()
    with pytest.raises(
        ValueError,
        match=r"batch: 4 model inputs before the labels, but input_keys names 2: "
        r"\['input_ids', 'attention_mask'\]; pass one name per input",
    ):
        TextClassificationOutput(input_keys=("input_ids", "attention_mask")).output(
            TextModel(), (ids, kinds, mask, mask, y)
        )
    with pytest.raises(ValueError, match=r"batch: the encoding lacks \['token_type_ids'\]"):
        TextClassificationOutput(input_keys=("input_ids", "token_type_ids")).output(
            TextModel(), ({"input_ids": ids, "attention_mask": mask}, y)
        )
    with pytest.raises(
        ValueError, match=r"model: RegressionOutput needs outputs of shape \(batch,\) or \(batch, 1\); got \(4, 3\)"
    ):
        RegressionOutput().output(Given(), (torch.randn(4, 3), torch.randn(4)))


def test_labels_out_of_range_name_the_examples_and_vmap_still_works():
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 3, 2, -1, 1, 2])
    for task in (ClassificationOutput(), TextClassificationOutput(input_keys=("input",))):
        model = (lambda input: input) if isinstance(task, TextClassificationOutput) else Given()
        for call in (task.out_to_loss_grad, task.loss):
            with pytest.raises(
                ValueError,
                match=r"labels: expected class indices in \[0, 3\) for the model's 3 "
                r"classes; got \[3, -1\] at positions \[1, 3\] of the batch",
            ):
                call(model, (logits, labels))
    # The check stays out of output, which per_example_grads runs under vmap.
    model = mlp(classes=3)
    x, y = torch.randn(5, 6), torch.tensor([0, 2, 1, 1, 0])
    task = ClassificationOutput()
    grads = ci.per_example_grads(model, lambda m, *b: task.output(m, b), (x, y), fallback="error")
    for i in range(5):
        ref = torch.autograd.grad(task.output(model, (x[i : i + 1], y[i : i + 1])).sum(), list(model.parameters()))
        for (name, g), r in zip(grads.items(), ref):
            assert torch.allclose(g[i], r, atol=1e-6), name


def test_prepare_rejects_a_model_that_returns_probabilities():
    batches = [(torch.randn(4, 6), torch.randint(0, 4, (4,)))]
    model = nn.Sequential(mlp(), nn.Softmax(dim=1))
    with pytest.raises(
        ValueError,
        match=r"model: forward returns the result of softmax \(module '1', called at .*\), not logits; "
        r".*ci.select_output\(model, 'logits'\)",
    ):
        ClassificationOutput().prepare(model, batches)
    ClassificationOutput().prepare(ci.select_output(model, "logits"), batches)
    ClassificationOutput().prepare(mlp(), batches)
