"""SimilarityInfluence against Captum 0.9 and the full similarity matrix sorted directly."""

import warnings

import pytest
import torch
from captum.influence import DataInfluence
from captum.influence import SimilarityInfluence as CaptumSimilarityInfluence
from captum.influence._core.similarity_influence import cosine_similarity as captum_cosine
from captum.influence._core.similarity_influence import euclidean_distance as captum_euclidean
from helpers import DropoutNet, TwiceNet, modes
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import captum_influence as ci
from captum_influence.similarity import cosine_similarity, euclidean_distance

N_SRC = 23  # no batch size used here divides it
METRICS = {"cosine": (cosine_similarity, captum_cosine), "euclidean": (euclidean_distance, captum_euclidean)}


def _mlp():
    """float64, Tanh between the layers so that no activation vector is zero."""
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def _data(n=N_SRC):
    return TensorDataset(torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,)))


def _test_inputs(n=4):
    return torch.randn(n, 5, dtype=torch.float64)


def _reference(model, layer, dataset, test, metric, direction, k):
    """Every similarity at once, sorted: (indices, values) of the top k per test example."""
    stop = int(layer) + 1
    with torch.no_grad():
        similarity = metric(model[:stop](test), model[:stop](dataset.tensors[0]))
    order = torch.argsort(similarity, dim=1, descending=direction == "max", stable=True)[:, :k]
    return order, similarity.gather(1, order)


def _forward_counter(model):
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("direction", ["max", "min"])
@pytest.mark.parametrize("layers", ["1", ["1"], ["1", "3"]])
@pytest.mark.parametrize("batch_size, top_k", [(5, 3), (7, 2), (1, 1)])
def test_matches_captum(tmp_path, metric, direction, layers, batch_size, top_k):
    model, data, test = _mlp(), _data(), _test_inputs()
    ours_metric, captum_metric = METRICS[metric]
    # Captum 0.9 fails on a single layer (LayerActivation gives a list, which it wraps again):
    # it always gets both layers here.
    captum = CaptumSimilarityInfluence(
        model,
        ["1", "3"],
        data,
        str(tmp_path / "captum"),
        similarity_metric=captum_metric,
        similarity_direction=direction,
        batch_size=batch_size,
    ).influence(test, top_k=top_k)
    ours = ci.SimilarityInfluence(
        model,
        layers,
        data,
        tmp_path / "ours",
        similarity_metric=ours_metric,
        similarity_direction=direction,
        batch_size=batch_size,
    ).influence(test, top_k=top_k)
    names = [layers] if isinstance(layers, str) else layers
    assert list(ours) == names
    for layer in names:
        indices, values = ours[layer]  # unpacks as Captum's (indices, similarities)
        assert torch.equal(indices, captum[layer][0])
        assert values.dtype == torch.float64
        torch.testing.assert_close(values, captum[layer][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("direction", ["max", "min"])
@pytest.mark.parametrize("block_size", [None, 1, 4])
def test_blockwise_top_k_equals_the_sorted_full_matrix(tmp_path, metric, direction, block_size):
    """top_k above the last batch's size (where Captum fails) and above the data's (clamped)."""
    model, data, test = _mlp(), _data(), _test_inputs(6)
    influence = ci.SimilarityInfluence(
        model,
        ["1", "3"],
        data,
        tmp_path,
        similarity_metric=METRICS[metric][0],
        similarity_direction=direction,
        batch_size=5,
        block_size=block_size,
    )
    for top_k in (4, 11, N_SRC + 5):
        result = influence.influence(test, top_k=top_k)
        for layer in ("1", "3"):
            indices, values = _reference(model, layer, data, test, METRICS[metric][0], direction, min(top_k, N_SRC))
            assert torch.equal(result[layer].indices, indices)
            torch.testing.assert_close(result[layer].influence_scores, values, rtol=1e-12, atol=1e-12)


def test_metrics_match_captums_on_nonzero_vectors():
    a, b = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(5, 2, 4, dtype=torch.float64)
    torch.testing.assert_close(cosine_similarity(a, b), captum_cosine(a, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(euclidean_distance(a, b), captum_euclidean(a, b), rtol=1e-12, atol=1e-12)


def test_euclidean_distance_keeps_near_duplicates_apart():
    """Differences, not ||a||^2 + ||b||^2 - 2<a, b>: a distance of 1e-4 between float32 vectors of
    norm ~300 survives (the expansion's cancellation returns 0 or noise)."""
    a = torch.full((1, 64), 40.0)
    b = a.clone()
    b[0, 0] += 1e-4
    torch.testing.assert_close(euclidean_distance(a, b), torch.tensor([[1e-4]]), rtol=1e-2, atol=0)


@pytest.mark.parametrize("direction", ["max", "min"])
def test_zero_activations_get_replace_nan_rank_last_and_are_listed(tmp_path, direction):
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
        model[0].bias.zero_()
    source = torch.randn(6, 3, dtype=torch.float64).abs()
    source[2] = -1.0  # a zero activation after the ReLU
    test = torch.randn(3, 3, dtype=torch.float64).abs()
    test[1] = -source[0]  # a zero test activation
    influence = ci.SimilarityInfluence(
        model, "1", TensorDataset(source), tmp_path, similarity_direction=direction, batch_size=4
    )
    with pytest.warns(RuntimeWarning, match="zero activation vectors"):
        result = influence.influence(test, top_k=6)
    replace = -2.0 if direction == "max" else 2.0
    expected = [[i, j] for i in range(3) for j in range(6) if i == 1 or j == 2]
    assert result["zero_acts-1"].tolist() == expected
    indices, values = result["1"]
    assert (values[1] == replace).all()
    assert indices[0, -1] == indices[2, -1] == 2 and values[0, -1] == values[2, -1] == replace
    # Captum's fill gives the zero test row cos = replace_nan * sum(b / ||b||), beyond [-1, 1]:
    captum = captum_cosine(test[1:2].relu(), source.relu(), replace)
    assert (captum[0].abs() > 1).any()


def test_captum_cosine_function_is_taken_as_the_cosine(tmp_path):
    model, data, test = _mlp(), _data(), _test_inputs()
    influence = ci.SimilarityInfluence(model, "1", data, tmp_path, similarity_metric=captum_cosine, batch_size=5)
    assert influence.replace_nan == -2.0
    ours = ci.SimilarityInfluence(model, "1", data, tmp_path, batch_size=5).influence(test, top_k=3)
    assert torch.equal(influence.influence(test, top_k=3)["1"].indices, ours["1"].indices)


def test_custom_metric_gets_unflattened_activations_as_in_captum(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).double().eval()
    data = TensorDataset(torch.randn(11, 1, 5, 5, dtype=torch.float64), torch.zeros(11))
    test = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    shapes = []

    def negative_l1(a, b):
        shapes.append(tuple(b.shape[1:]))
        return -(a.flatten(1)[:, None] - b.flatten(1)[None]).abs().sum(-1)

    captum = CaptumSimilarityInfluence(
        model, ["1", "3"], data, str(tmp_path / "captum"), similarity_metric=negative_l1, batch_size=4
    ).influence(test, top_k=2)
    shapes.clear()
    ours = ci.SimilarityInfluence(
        model, "1", data, tmp_path / "ours", similarity_metric=negative_l1, batch_size=4
    ).influence(test, top_k=2)
    assert set(shapes) == {(2, 3, 3)}
    assert torch.equal(ours["1"].indices, captum["1"][0])
    torch.testing.assert_close(ours["1"].influence_scores, captum["1"][1], rtol=1e-12, atol=1e-12)


def test_additional_forward_args_reach_the_test_forward_only(tmp_path):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(5, 4), nn.Tanh()

        def forward(self, x, scale=1.0):
            return self.act(self.fc(x) * scale)

    model, data, test = Scaled().double().eval(), _data(), _test_inputs()
    captum = CaptumSimilarityInfluence(model, ["fc", "act"], data, str(tmp_path / "captum"), batch_size=5).influence(
        test, top_k=3, additional_forward_args=2.0
    )
    ours = ci.SimilarityInfluence(model, "act", data, tmp_path / "ours", batch_size=5).influence(
        test, top_k=3, additional_forward_args=2.0
    )
    assert torch.equal(ours["act"].indices, captum["act"][0])
    torch.testing.assert_close(ours["act"].influence_scores, captum["act"][1], rtol=1e-12, atol=1e-12)


def test_dataloader_and_unlabelled_data_give_the_same_result(tmp_path):
    model, data, test = _mlp(), _data(), _test_inputs()
    expected = ci.SimilarityInfluence(model, "3", data, tmp_path / "a", batch_size=5).influence(test, top_k=4)["3"]
    for i, source in enumerate([DataLoader(data, batch_size=6), TensorDataset(data.tensors[0])]):
        got = ci.SimilarityInfluence(model, "3", source, tmp_path / f"b{i}", batch_size=5).influence(test, top_k=4)["3"]
        assert torch.equal(got.indices, expected.indices)
        torch.testing.assert_close(got.influence_scores, expected.influence_scores, rtol=1e-12, atol=1e-12)


def test_activations_in_eval_mode_and_modes_restored(tmp_path):
    torch.manual_seed(1)
    model = DropoutNet(d=5).double().train()
    data, test = _data(), _test_inputs()
    before = modes(model)
    ours = ci.SimilarityInfluence(model, "fc1", data, tmp_path, batch_size=5).influence(test, top_k=3)
    assert modes(model) == before
    captum = CaptumSimilarityInfluence(model.eval(), ["fc1", "fc2"], data, str(tmp_path / "captum"), batch_size=5)
    captum = captum.influence(test, top_k=3)
    assert torch.equal(ours["fc1"].indices, captum["fc1"][0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu(tmp_path):
    model, data, test = _mlp(), _data(), _test_inputs()
    cpu = ci.SimilarityInfluence(model, ["1", "3"], data, tmp_path / "cpu", batch_size=5).influence(test, top_k=3)
    gpu = ci.SimilarityInfluence(model.cuda(), ["1", "3"], data, tmp_path / "gpu", batch_size=5)
    gpu = gpu.influence(test, top_k=3)
    for layer in ("1", "3"):
        assert gpu[layer].indices.device.type == "cuda"
        assert torch.equal(gpu[layer].indices.cpu(), cpu[layer].indices)
        torch.testing.assert_close(
            gpu[layer].influence_scores.cpu(), cpu[layer].influence_scores, rtol=1e-10, atol=1e-10
        )


# --- the activation cache ----------------------------------------------------------------------


def test_cache_is_reused_on_a_second_call(tmp_path):
    model, data, test = _mlp(), _data(), _test_inputs()
    calls = _forward_counter(model)
    influence = ci.SimilarityInfluence(model, ["1", "3"], data, tmp_path, model_id="mlp", batch_size=5)
    first = influence.influence(test, top_k=3)
    assert len(calls) == 1 + 2 * 5  # the test batch, then each layer's pass over 5 source batches
    assert (tmp_path / "mlp" / "src" / "3" / "activations.npy").exists()
    calls.clear()
    again = ci.SimilarityInfluence(model, ["3", "1"], data, tmp_path, model_id="mlp", batch_size=5)
    again = again.influence(test, top_k=3)
    assert calls == [len(test)]  # only the test batch
    for layer in ("1", "3"):
        assert torch.equal(first[layer].indices, again[layer].indices)
        torch.testing.assert_close(first[layer].influence_scores, again[layer].influence_scores, rtol=0, atol=0)


def test_cache_of_another_model_is_refused_and_rebuilt_on_request(tmp_path):
    model, data, test = _mlp(), _data(), _test_inputs()
    influence = ci.SimilarityInfluence(model, "3", data, tmp_path, batch_size=5)
    influence.influence(test)
    with torch.no_grad():
        model[2].weight.mul_(1.5)
    with pytest.raises(ValueError, match=r"activation_dir: .*model.*load_src_from_disk=False"):
        influence.influence(test)
    rebuilt = influence.influence(test, top_k=3, load_src_from_disk=False)
    fresh = ci.SimilarityInfluence(model, "3", data, tmp_path / "fresh", batch_size=5).influence(test, top_k=3)
    assert torch.equal(rebuilt["3"].indices, fresh["3"].indices)
    torch.testing.assert_close(rebuilt["3"].influence_scores, fresh["3"].influence_scores, rtol=0, atol=0)
    influence.influence(test)  # the rebuilt cache is this model's


@pytest.mark.parametrize("change", ["values", "size", "batch_size"])
def test_cache_of_other_data_is_refused(tmp_path, change):
    model, data, test = _mlp(), _data(), _test_inputs()
    ci.SimilarityInfluence(model, "1", data, tmp_path, batch_size=5).influence(test)
    other, batch_size, what = {
        "values": (_data(), 5, "data"),
        "size": (_data(N_SRC + 1), 5, "data"),
        "batch_size": (data, 4, "batch_size"),
    }[change]
    with pytest.raises(ValueError, match=f"activation_dir: .*{what}"):
        ci.SimilarityInfluence(model, "1", other, tmp_path, batch_size=batch_size).influence(test)
    ci.SimilarityInfluence(model, "1", other, tmp_path / "other", batch_size=batch_size).influence(test)


def test_model_id_keeps_models_apart(tmp_path):
    first, second, data, test = _mlp(), _mlp(), _data(), _test_inputs()
    a = ci.SimilarityInfluence(first, "3", data, tmp_path, model_id="a", batch_size=5).influence(test, top_k=3)
    b = ci.SimilarityInfluence(second, "3", data, tmp_path, model_id="b", batch_size=5).influence(test, top_k=3)
    assert not torch.equal(a["3"].influence_scores, b["3"].influence_scores)


def test_interrupted_pass_resumes_from_the_finished_batches(tmp_path):
    model, data, test = _mlp(), _data(), _test_inputs()
    calls = _forward_counter(model)

    def fail_on_fourth_source_batch(module, args):
        if len(calls) == 5:
            raise RuntimeError("killed")

    handle = model.register_forward_pre_hook(fail_on_fourth_source_batch)
    influence = ci.SimilarityInfluence(model, "3", data, tmp_path, batch_size=5)
    with pytest.raises(RuntimeError, match="killed"):
        influence.influence(test)
    handle.remove()
    calls.clear()
    resumed = influence.influence(test, top_k=3)
    assert calls == [len(test), 5, 3]  # the test batch, then source batches 15-19 and 20-22
    fresh = ci.SimilarityInfluence(model, "3", data, tmp_path / "fresh", batch_size=5).influence(test, top_k=3)
    assert torch.equal(resumed["3"].indices, fresh["3"].indices)
    torch.testing.assert_close(resumed["3"].influence_scores, fresh["3"].influence_scores, rtol=0, atol=0)


# --- the public face and bad input -------------------------------------------------------------


def test_exported_at_top_level_as_a_data_influence():
    assert issubclass(ci.SimilarityInfluence, DataInfluence) and "SimilarityInfluence" in ci.__all__


def test_bad_constructor_arguments(tmp_path):
    model, data = _mlp(), _data()

    def build(**kwargs):
        args = dict(module=model, layers="1", influence_src_dataset=data, activation_dir=tmp_path)
        return ci.SimilarityInfluence(**{**args, **kwargs})

    cases = [
        (TypeError, "module", dict(module=lambda x: x)),
        (ValueError, "layers: 'fc'", dict(layers="fc")),
        (TypeError, "layers", dict(layers=[])),
        (TypeError, "layers", dict(layers=["1", 3])),
        (ValueError, "layers: names repeat", dict(layers=["1", "1"])),
        (TypeError, "influence_src_dataset", dict(influence_src_dataset=[1, 2])),
        (ValueError, "influence_src_dataset: a shuffling", dict(influence_src_dataset=DataLoader(data, shuffle=True))),
        (TypeError, "influence_src_dataset: an IterableDataset", dict(influence_src_dataset=_Stream())),
        (ValueError, "batch_size", dict(batch_size=0)),
        (TypeError, "activation_dir", dict(activation_dir=None)),
        (TypeError, "model_id", dict(model_id=3)),
        (ValueError, "similarity_direction", dict(similarity_direction="largest")),
        (TypeError, "similarity_metric", dict(similarity_metric="cosine")),
        (ValueError, "replace_nan", dict(similarity_metric=euclidean_distance, replace_nan=0.0)),
        (TypeError, "replace_nan", dict(replace_nan="zero")),
        (ValueError, "block_size", dict(block_size=0)),
        (TypeError, "unknown keyword arguments \\['similarity_directon'\\]", dict(similarity_directon="min")),
    ]
    for error, match, kwargs in cases:
        with pytest.raises(error, match=match):
            build(**kwargs)


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(5), 0


def test_bad_influence_arguments(tmp_path):
    model, data, test = _mlp(), _data(), _test_inputs()
    influence = ci.SimilarityInfluence(model, "1", data, tmp_path, batch_size=5)
    cases = [
        (ValueError, "top_k", dict(top_k=0)),
        (ValueError, "top_k", dict(top_k=True)),
        (TypeError, "load_src_from_disk", dict(load_src_from_disk="yes")),
        (TypeError, "unknown keyword", dict(topk=3)),
        (ValueError, "inputs: no tensor", dict(inputs=[[1.0] * 5])),
        (TypeError, "inputs", dict(inputs="text")),
    ]
    for error, match, kwargs in cases:
        with pytest.raises(error, match=match):
            influence.influence(**{"inputs": test, **kwargs})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        influence.influence(test, load_input_from_disk=True, inputs_id="x")  # Captum's, unused there too


def test_metric_of_the_wrong_shape_or_nan_is_refused(tmp_path):
    model, data, test = _mlp(), _data(), _test_inputs()
    for metric, error, match in [
        (lambda a, b: a.flatten(1) @ b.flatten(1).T[:, :1], ValueError, r"similarity_metric: returned shape"),
        (lambda a, b: (a.flatten(1) @ b.flatten(1).T).tolist(), TypeError, "similarity_metric: returned list"),
        (lambda a, b: torch.full((len(a), len(b)), float("nan")), ValueError, "similarity_metric: returned NaN"),
    ]:
        influence = ci.SimilarityInfluence(model, "1", data, tmp_path, similarity_metric=metric, batch_size=5)
        with pytest.raises(error, match=match):
            influence.influence(test)


def test_layers_called_twice_or_not_per_example_are_refused(tmp_path):
    twice = TwiceNet(d=5).double().eval()
    with pytest.raises(ValueError, match="layers: module 'mix' was called 2 times"):
        ci.SimilarityInfluence(twice, "mix", _data(), tmp_path).influence(_test_inputs())

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.pool = nn.Linear(5, 3), nn.Identity()

        def forward(self, x):
            return self.pool(self.fc(x).sum(0))

    with pytest.raises(ValueError, match="layers: module 'pool' returned"):
        ci.SimilarityInfluence(Pooled().double(), "pool", _data(), tmp_path / "p").influence(_test_inputs())
