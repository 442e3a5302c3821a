"""Featurisation throughput: per-example gradients projected to k dimensions, in examples/s.

Side by side in one run, for a ResNet-9 on 32x32 images and a small transformer:
  - ours, hooks path (LayerGrads: per-layer gradients from hooks, projected as produced) in
    float32, TF32 and bfloat16 products;
  - ours, factored projection (TRAK's projection="factored": each Linear / Conv layer's input and
    output gradient projected separately, their outer product kept; float32, and bfloat16 on GPU);
  - ours, vmap path (torch.func per-example gradients, then Projector.project);
  - traker (fast_jl CudaProjector when it is installed, else BasicProjector) with its
    FunctionalGradientComputer;
  - Captum's TracInCP (sample-wise gradients per batch, no projection);
  - the reference: one batched forward + backward of the same model and batch.
It also checks that the hooks path gives the vmap path's features (same projection matrix).

    python benchmarks/featurize_speed.py --quick --threads 1   # small CPU sizes (about 1-2 minutes)
    python benchmarks/featurize_speed.py --device cuda      # ResNet-9 2.3M params, batch 128, k 2048
    python benchmarks/featurize_speed.py --device cuda --out results.txt   # the table also to a file
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from captum_influence._backend import Projector, param_shapes, select_param_names
from captum_influence._backend.factored_projection import FactoredProjector, factorable
from captum_influence._backend.layer_grads import LayerGrads, projected_grads

# --- models --------------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def resnet9(num_classes: int = 10, width: int = 64) -> nn.Module:
    """The ResNet-9 of the TRAK CIFAR-10 examples (width 64: 2.27M parameters)."""

    def conv_bn(c_in, c_out, kernel=3, stride=1, padding=1):
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )

    w1, w2, w4 = width, 2 * width, 4 * width
    return nn.Sequential(
        conv_bn(3, w1),
        conv_bn(w1, w2, kernel=5, stride=2, padding=2),
        Residual(nn.Sequential(conv_bn(w2, w2), conv_bn(w2, w2))),
        conv_bn(w2, w4),
        nn.MaxPool2d(2),
        Residual(nn.Sequential(conv_bn(w4, w4), conv_bn(w4, w4))),
        conv_bn(w4, w2, padding=0),
        nn.AdaptiveMaxPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(w2, num_classes, bias=False),
        Scale(0.2),
    )


class Block(nn.Module):
    """Pre-norm transformer block with separate q, k, v, o projections (nn.Linear)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (m(h).reshape(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(att)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int, length: int, dim: int, layers: int, heads: int, num_classes: int = 10):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(length, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids):
        # Position ids per example (batch first), as the hooks path needs for per-example gradients.
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.tokens(ids) + self.positions(positions)
        return self.head(self.norm(self.blocks(x)).mean(1))


def margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TRAK's output function: logit_y - logsumexp_{j != y} logit_j, one per example."""
    logits = model(x)
    correct = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf"))
    return correct - others.logsumexp(1)


# --- timing --------------------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    model: nn.Module
    batches: list
    proj_dim: int
    device: torch.device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(step: Callable, batches: list, device: torch.device, warmup: int = 2) -> float:
    """Examples per second of ``step(batch)`` over ``batches`` after ``warmup`` untimed calls."""
    for batch in batches[:warmup]:
        step(batch)
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    sync(device)
    return sum(len(b[-1]) for b in batches) / (time.perf_counter() - start)


def make_projector(setup: Setup, dtype: torch.dtype) -> Projector:
    """The full matrix, generated once and kept on the device (it fits a GPU's memory)."""
    names = select_param_names(setup.model)
    shapes = param_shapes(setup.model, names)
    grad_dim = sum(math.prod(s) for s in shapes.values())
    nbytes = grad_dim * setup.proj_dim * torch.finfo(dtype).bits // 8
    block_rows = 65536 if setup.device.type == "cuda" else 4096
    proj = Projector(
        shapes,
        setup.proj_dim,
        seed=0,
        dtype=dtype,
        device=setup.device,
        block_rows=block_rows,
        cache_bytes=nbytes + 2**20,
    )
    start = time.perf_counter()
    proj.matrix() if nbytes < 2**28 else [proj.block(i) for i in range(math.ceil(grad_dim / block_rows))]
    sync(setup.device)
    print(
        f"  projection matrix {grad_dim} x {setup.proj_dim} {str(dtype)[6:]}: "
        f"generated in {time.perf_counter() - start:.1f} s"
    )
    return proj


def run_ours(setup: Setup, results: dict) -> dict:
    features = {}
    proj32 = make_projector(setup, torch.float32)
    proj16 = make_projector(setup, torch.bfloat16)
    for label, precision, proj in (
        ("ours hooks fp32", "exact", proj32),
        ("ours hooks tf32", "tf32", proj32),
        ("ours hooks bf16", "bf16", proj16),
    ):
        if setup.device.type == "cpu" and precision != "exact":
            continue  # TF32 does not exist on CPU and bf16 products there are slow, not fast
        lg = LayerGrads(setup.model, precision=precision)
        results[label] = throughput(lambda b: lg.project(margin, b, proj), setup.batches, setup.device)
        features[label] = lg.project(margin, setup.batches[0], proj)
    for dtype in (torch.float32, torch.bfloat16):
        if setup.device.type == "cpu" and dtype != torch.float32:
            continue
        lg = LayerGrads(setup.model)
        proj = factored_projector(lg, setup, dtype)
        label = f"ours factored {'fp32' if dtype == torch.float32 else 'bf16'}"
        results[label] = throughput(lambda b: lg.project(margin, b, proj), setup.batches, setup.device)
    results["ours vmap fp32"] = throughput(
        lambda b: projected_grads(setup.model, margin, b, proj32, method="vmap"), setup.batches, setup.device
    )
    features["ours vmap fp32"] = projected_grads(setup.model, margin, setup.batches[0], proj32, method="vmap")
    return features


def factored_projector(lg: LayerGrads, setup: Setup, dtype: torch.dtype) -> FactoredProjector:
    """TRAK's factored projection: every Linear / Conv layer the hooks cover, the rest dense."""
    lg.check(margin, setup.batches[0])
    layers = {path: m for path, m in lg.covered_modules().items() if factorable(m)}
    held = {name for m in layers.values() for name in lg.module_params(m)}
    dense = {n: p.shape for n, p in setup.model.named_parameters() if n not in held}
    return FactoredProjector(layers, dense, setup.proj_dim, seed=0, dtype=dtype, device=setup.device)


def run_reference(setup: Setup, results: dict) -> None:
    params = [p for p in setup.model.parameters() if p.requires_grad]

    def step(batch):
        torch.autograd.grad(margin(setup.model, *batch).sum(), params)

    results["batched fwd+bwd"] = throughput(step, setup.batches, setup.device)


def run_traker(setup: Setup, results: dict) -> Optional[str]:
    try:
        from trak import TRAKer
        from trak.projectors import BasicProjector, CudaProjector, ProjectionType
    except ImportError as err:
        return f"traker not installed ({err}): its row is skipped"
    grad_dim = sum(p.numel() for p in setup.model.parameters())
    kind = "BasicProjector"
    projector = None
    if setup.device.type == "cuda":
        try:
            import fast_jl  # noqa: F401

            projector = CudaProjector(
                grad_dim, setup.proj_dim, 0, ProjectionType.rademacher, setup.device, max_batch_size=32
            )
            kind = "CudaProjector (fast_jl)"
        except ImportError:
            pass
    if projector is None:
        projector = BasicProjector(grad_dim, setup.proj_dim, 0, ProjectionType.rademacher, setup.device)
    n = sum(len(b[-1]) for b in setup.batches) * 2
    with tempfile.TemporaryDirectory() as tmp:
        traker = TRAKer(
            setup.model,
            "image_classification",
            n,
            save_dir=tmp,
            device=setup.device,
            projector=projector,
            proj_dim=setup.proj_dim,
            logging_level=40,
            use_half_precision=setup.device.type == "cuda",
        )
        traker.load_checkpoint(setup.model.state_dict(), model_id=0)
        results[f"traker {kind}"] = throughput(
            lambda b: traker.featurize(b, num_samples=len(b[-1])), setup.batches, setup.device
        )
    return None


def run_captum(setup: Setup, results: dict) -> Optional[str]:
    try:
        from captum.influence import TracInCP
    except ImportError as err:
        return f"Captum not installed ({err}): its row is skipped"

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/model.pt"
        torch.save(setup.model.state_dict(), path)
        tracin = TracInCP(
            setup.model,
            torch.utils.data.TensorDataset(*setup.batches[0]),
            [path],
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            sample_wise_grads_per_batch=True,
            batch_size=len(setup.batches[0][-1]),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covered = tracin.compute_intermediate_quantities(setup.batches[0]).shape[1]
            results["Captum TracInCP (no proj.)"] = throughput(
                lambda b: tracin.compute_intermediate_quantities(b), setup.batches, setup.device
            )
    total = sum(p.numel() for p in setup.model.parameters())
    return None if covered == total else f"Captum TracInCP took gradients of {covered} of {total} parameters"


def report(setup: Setup, results: dict, features: dict, notes: list) -> list[str]:
    """Print the setup's table and return its lines."""
    ref = results["batched fwd+bwd"]
    n_params = sum(p.numel() for p in setup.model.parameters())
    batch = len(setup.batches[0][-1])
    lines = [
        f"\n{setup.name}: {n_params / 1e6:.2f}M parameters, batch {batch}, projection {setup.proj_dim}, "
        f"{len(setup.batches)} timed batches, {setup.device}"
    ]
    best_ours = max(v for k, v in results.items() if k.startswith("ours"))
    lines.append(f"  {'method':32s} {'examples/s':>11s} {'vs fwd+bwd':>11s} {'best ours vs it':>16s}")
    for label, value in results.items():
        lines.append(f"  {label:32s} {value:11,.0f} {value / ref:11.2f} {best_ours / value:16.2f}")
    exact = features["ours vmap fp32"]
    for label, f in features.items():
        if label != "ours vmap fp32":
            rel = ((f - exact).norm(dim=1) / exact.norm(dim=1)).max().item()
            lines.append(f"  max relative difference of '{label}' features from 'ours vmap fp32': {rel:.1e}")
    lines += [f"  note: {note}" for note in notes if note]
    print("\n".join(lines), flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes for a CPU run of a minute or two")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per method")
    parser.add_argument("--models", default="resnet9,transformer")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (1 gives steadier timings on a busy machine)"
    )
    parser.add_argument("--out", default=None, help="also write the tables to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    if args.quick:
        batch, k, n_batches, width = 32, 256, args.batches or 3, 16
        tsize = dict(vocab=200, length=32, dim=64, layers=2, heads=4)
    else:
        batch, k, n_batches, width = 128, 2048, args.batches or 20, 64
        tsize = dict(vocab=1000, length=128, dim=256, layers=4, heads=4)
    if device.type == "cuda":
        header = f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    else:
        header = f"CPU: {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(header)
    lines = [header]
    setups = []
    if "resnet9" in args.models:
        model = resnet9(width=width).to(device).eval()
        data = [
            (torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device))
            for _ in range(n_batches)
        ]
        setups.append(Setup("ResNet-9, 32x32 images", model, data, k, device))
    if "transformer" in args.models:
        model = TinyTransformer(**tsize).to(device).eval()
        data = [
            (
                torch.randint(0, tsize["vocab"], (batch, tsize["length"]), device=device),
                torch.randint(0, 10, (batch,), device=device),
            )
            for _ in range(n_batches)
        ]
        setups.append(
            Setup(
                f"Transformer, {tsize['layers']} layers, width {tsize['dim']}, {tsize['length']} tokens",
                model,
                data,
                k,
                device,
            )
        )
    for setup in setups:
        print(f"\n{setup.name}")
        results: dict = {}
        run_reference(setup, results)
        features = run_ours(setup, results)
        notes = [run_traker(setup, results), run_captum(setup, results)]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        lines += report(setup, results, features, notes)
        if args.out:  # written after each setup, so a run cut short keeps what it measured
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
