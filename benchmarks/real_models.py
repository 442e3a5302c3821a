"""Per-example gradient + projection throughput on tiny transformers models, in examples/s.

Tiny BERT (sequence classification), GPT-2 (language model) and ViT (image classification), built
from configs with random weights (nothing downloaded), float32, eval mode, batch 64 (TRAK's default
batch_size; ``--batch``), 32 tokens for text, every trainable parameter, projected to 256 dimensions
by one ``ci.Projector``. The per-example function is TRAK's margin of the labelled class (BERT, ViT)
and minus the mean next-token cross-entropy (GPT-2). Timed side by side in one run, each after one
untimed batch (which also generates the projection matrix, kept in the projector's cache):

  - ours: ``projected_grads(model, fn, batch, projector, method="hooks")``, per-layer gradients
    from one batched forward and backward, each projected as it is produced. Each call builds
    a new ``LayerGrads``, whose one-time check against autograd then runs on every batch;
  - ours, kept: one ``LayerGrads(model)`` whose ``project`` is called for every batch, as TRAK
    does (the check runs on the untimed batch only);
  - loop: for each example a forward and ``torch.autograd.grad`` on that example alone, the
    flattened gradients of the batch then projected with the same projector;
  - Captum: 0.9's ``TracInCP.compute_intermediate_quantities`` on the batch (one forward, then one
    backward per example, ``sample_wise_grads_per_batch=False``: its only path that covers the
    LayerNorm and Embedding parameters), with the same function as its per-example ``loss_fn``,
    a checkpoint loader that does nothing (the weights are already in the model), and its
    flattened gradients projected with the same projector.

The table gives examples/s for each, ours / loop for both of ours, and the largest relative
difference ||ours - loop|| / ||loop|| over the examples of the first batch, for either of ours
(Captum's below the table).

    python benchmarks/real_models.py --quick --threads 1     # the test suite's size
    python benchmarks/real_models.py --threads 1 --batches 10
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import captum_influence as ci
from captum_influence._backend import LayerGrads, param_shapes, select_param_names
from captum_influence._backend.layer_grads import projected_grads

BATCH, LENGTH, PROJECTION_DIM = 64, 32, 256


# --- models, batches and per-example functions of the logits -----------------------------------


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """g_y - logsumexp_{j != y} g_j, one per example."""
    correct = logits.gather(1, labels[:, None])[:, 0]
    return correct - logits.scatter(1, labels[:, None], float("-inf")).logsumexp(1)


def next_token_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus each sequence's mean next-token cross-entropy."""
    return -F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none").mean(1)


def bert(transformers, generator: torch.Generator) -> tuple[nn.Module, Callable, Callable]:
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )

    def batch():
        lengths = torch.randint(LENGTH // 2, LENGTH + 1, (BATCH,), generator=generator)
        positions = torch.arange(LENGTH)[None, :]
        mask = (positions < lengths[:, None]).long()
        ids = torch.randint(1, 100, (BATCH, LENGTH), generator=generator) * mask
        token_types = ((positions >= lengths[:, None] // 2) & (mask == 1)).long()
        return ids, mask, token_types, torch.randint(0, 3, (BATCH,), generator=generator)

    return transformers.BertForSequenceClassification(config), batch, margins


def gpt2(transformers, generator: torch.Generator) -> tuple[nn.Module, Callable, Callable]:
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )

    def batch():
        ids = torch.randint(0, 64, (BATCH, LENGTH), generator=generator)
        return ids, ids.clone()

    return transformers.GPT2LMHeadModel(config), batch, next_token_scores


def vit(transformers, generator: torch.Generator) -> tuple[nn.Module, Callable, Callable]:
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

    def batch():
        return torch.randn(BATCH, 3, 16, 16, generator=generator), torch.randint(0, 3, (BATCH,), generator=generator)

    return transformers.ViTForImageClassification(config), batch, margins


MODELS = {"BERT": bert, "GPT-2": gpt2, "ViT": vit}


class Logits(nn.Module):
    """``model(*inputs).logits``, for Captum, which hands the model's output to ``loss_fn`` as it is."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model(*inputs).logits


class PerExample(nn.Module):
    """A function of (logits, labels) with one value per example, as Captum's ``loss_fn``."""

    reduction = "none"

    def __init__(self, head: Callable):
        super().__init__()
        self.head = head

    def forward(self, logits, labels):
        return self.head(logits, labels)


# --- the three ways -----------------------------------------------------------------------------


def loop_features(model: nn.Module, fn: Callable, batch: tuple, projector: ci.Projector) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for b in range(len(batch[-1])):
        out = fn(model, *(t[b : b + 1] for t in batch))
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[0], params)]))
    return projector.project(torch.stack(rows))


def captum_features(tracin, batch: tuple, projector: ci.Projector) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return projector.project(tracin.compute_intermediate_quantities(batch))


def throughput(step: Callable, batches: list) -> float:
    """Examples per second of ``step(batch)`` over ``batches[1:]``, after ``batches[0]`` untimed."""
    step(batches[0])
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    return sum(len(b[-1]) for b in batches[1:]) / (time.perf_counter() - start)


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((ours - reference).norm(dim=1) / reference.norm(dim=1)).max())


def run(name: str, transformers, n_batches: int) -> dict:
    from captum.influence import TracInCP

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model, make_batch, head = MODELS[name](transformers, generator)
    model = model.float().eval()

    def fn(m: nn.Module, *batch) -> torch.Tensor:
        return head(m(*batch[:-1]).logits, batch[-1])

    batches = [make_batch() for _ in range(n_batches + 1)]
    names = select_param_names(model)
    projector = ci.Projector(param_shapes(model, names), PROJECTION_DIM, seed=0)
    captum = TracInCP(
        Logits(model),
        torch.utils.data.TensorDataset(*batches[0]),
        ["unused"],
        checkpoints_load_func=lambda m, path: 1.0,
        loss_fn=PerExample(head),
        sample_wise_grads_per_batch=False,
        batch_size=BATCH,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback warning is reported by the tests, not here
        ours = lambda b: projected_grads(model, fn, b, projector, method="hooks")
        kept = LayerGrads(model)
        result = {
            "params": sum(p.numel() for p in model.parameters()),
            "ours": throughput(ours, batches),
            "kept": throughput(lambda b: kept.project(fn, b, projector), batches),
            "loop": throughput(lambda b: loop_features(model, fn, b, projector), batches),
            "captum": throughput(lambda b: captum_features(captum, b, projector), batches),
        }
        reference = loop_features(model, fn, batches[0], projector)
        result["diff"] = max(
            relative_difference(ours(batches[0]), reference),
            relative_difference(kept.project(fn, batches[0], projector), reference),
        )
        result["captum diff"] = relative_difference(captum_features(captum, batches[0], projector), reference)
    return result


def main() -> None:
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two timed batches per method (the test suite's size)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per method (default 10, quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 gives steadier timings)")
    parser.add_argument(
        "--batch", type=int, default=BATCH, help=f"examples per batch (default {BATCH}, TRAK's batch_size)"
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    args = parser.parse_args()
    BATCH = args.batch
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_batches = args.batches or (2 if args.quick else 10)
    print(
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"float32, batch {BATCH}, {LENGTH} tokens, projection {PROJECTION_DIM}, {n_batches} timed batches"
    )
    print(
        f"{'model':8s} {'params':>8s} {'ours ex/s':>10s} {'kept ex/s':>10s} {'loop ex/s':>10s} "
        f"{'Captum ex/s':>12s} {'ours/loop':>10s} {'kept/loop':>10s} {'max rel diff':>13s}"
    )
    notes = []
    for name in args.models.split(","):
        r = run(name, transformers, n_batches)
        print(
            f"{name:8s} {r['params']:8,d} {r['ours']:10,.0f} {r['kept']:10,.0f} {r['loop']:10,.0f} "
            f"{r['captum']:12,.0f} {r['ours'] / r['loop']:9.1f}x {r['kept'] / r['loop']:9.1f}x {r['diff']:13.1e}"
        )
        notes.append(f"{name}: Captum's features differ from the loop's by at most {r['captum diff']:.1e}")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
