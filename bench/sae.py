"""Benchmark: the SAE trainers against a peer TopK SAE, the paper variant at D = 512, and its memory.

    python bench/sae.py            # acceptance size: D = 512, 4096 latents, k = 32, batch 4096
    python bench/sae.py --quick    # D = 128, 1024 latents, batch 1024 (a minute or two)

Each contender runs in its own subprocess, so its peak RSS (ru_maxrss) is its own:

- topk-ours: `misp_dpo.sae.train_sae(variant="topk")` on clustered unit vectors (CLIP-like), data in
  memory; samples/s of the training loop, held-out FVU (mean-centred);
- topk-peer: overcomplete's TopKSAE (`pip install overcomplete`, the `bench` extra) with its own
  `train_sae` loop and DataLoader, MSE loss (its README's recipe), same data, D, latents, k, batch
  size, epochs and Adam lr; its held-out FVU computed by the same formula;
- paper: the fused-difference SAE at D = 512 (128 latents, pools of 64 candidates): samples/s,
  where a sample is one (pair, candidate) difference, i.e. a D² = 262 144-entry input never built;
- memory: one paper training step at D = 512 in a fresh process for several batch sizes: the
  peak-RSS slope per sample, against latents x D and D² floats per sample.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared fixtures: tests.helpers

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def vectors(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    from tests.helpers import clustered_unit_vectors

    rng = np.random.default_rng(0)
    x, _ = clustered_unit_vectors(args.n, args.dim, max(10, args.n // 500), 0.8 / np.sqrt(args.dim), rng)
    return x, np.arange(args.n) % 10 == 0


def fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def lr(args: argparse.Namespace) -> float:
    return 2e-4 / np.sqrt(args.latents / 2**14)


def role_topk_ours(args: argparse.Namespace) -> dict:
    from misp_dpo.sae.data import VectorChunk, in_memory
    from misp_dpo.sae.trainer import TrainSettings, train_sae

    x, heldout = vectors(args)
    dataset = in_memory(VectorChunk(x), heldout)
    settings = TrainSettings(
        variant="topk", latents=args.latents, k=args.k, batch_size=args.batch, epochs=args.epochs, lr=lr(args)
    )
    started = time.perf_counter()
    result = train_sae(dataset, settings)
    total = time.perf_counter() - started
    return {
        "samples_per_s": result.throughput,
        "samples_per_cpu_s": result.settings.steps * result.settings.batch_size / result.cpu_seconds,
        "fvu": result.metrics["fvu"],
        "dead": result.metrics["dead_fraction"],
        "steps": result.settings.steps,
        "total_s": total,
    }


def role_topk_peer(args: argparse.Namespace) -> dict:
    import matplotlib
    import torch

    if not hasattr(
        matplotlib.cm, "get_cmap"
    ):  # overcomplete 0.3 imports its plots, written for matplotlib < 3.9
        matplotlib.cm.get_cmap = lambda name: matplotlib.colormaps[name]
    from overcomplete.sae import TopKSAE
    from overcomplete.sae import train_sae as peer_train
    from torch.utils.data import DataLoader, TensorDataset

    x, heldout = vectors(args)
    train, test = torch.from_numpy(x[~heldout]), torch.from_numpy(x[heldout])
    torch.manual_seed(0)
    model = TopKSAE(args.dim, nb_concepts=args.latents, top_k=args.k, device="cpu")
    loader = DataLoader(TensorDataset(train), batch_size=args.batch, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr(args))

    def criterion(x, x_hat, pre_codes, codes, dictionary):  # noqa: ANN001, ANN202 - the peer's signature
        return (x - x_hat).square().mean()

    epochs = max(1, round(args.epochs))
    started, cpu = time.perf_counter(), time.process_time()
    peer_train(model, loader, criterion, optimizer, nb_epochs=epochs, monitoring=0, device="cpu")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    model.eval()
    with torch.no_grad():
        x_hat = torch.cat([model(test[i : i + 4096])[2] for i in range(0, len(test), 4096)]).numpy()
        codes = torch.cat([model(train[i : i + 4096])[1] for i in range(0, len(train), 4096)])
    return {
        "samples_per_s": epochs * len(train) / seconds,
        "samples_per_cpu_s": epochs * len(train) / cpu,
        "fvu": fvu(test.numpy(), x_hat),
        "dead": float(((codes > 0).sum(0) == 0).float().mean()),
        "total_s": seconds,
    }


def pools(pairs: int, width: int, dim: int, seed: int = 0) -> object:
    from misp_dpo.sae.data import PoolChunk, in_memory
    from tests.helpers import clustered_unit_vectors

    rng = np.random.default_rng(seed)
    images, _ = clustered_unit_vectors(pairs * 4, dim, 50, 0.8 / np.sqrt(dim), rng, dtype=np.float16)
    prompt, _ = clustered_unit_vectors(pairs, dim, 20, 0.8 / np.sqrt(dim), rng, dtype=np.float16)
    candidates = rng.integers(0, len(images), size=(pairs, width))
    chunk = PoolChunk(images[:pairs], prompt, candidates)
    return in_memory(chunk, np.arange(pairs) % 10 == 0, images)


def role_paper(args: argparse.Namespace) -> dict:
    from misp_dpo.sae.trainer import TrainSettings, train_sae

    dataset = pools(args.pairs, 64, args.paper_dim)
    settings = TrainSettings(variant="paper", batch_size=args.paper_batch, steps=args.paper_steps)
    result = train_sae(dataset, settings)
    return {"samples_per_s": result.throughput, "steps": result.settings.steps, "fvu": result.metrics["fvu"]}


def role_memory(args: argparse.Namespace) -> dict:
    """One training step with `--memory-pairs` pairs of 64 candidates; ru_maxrss is the peak."""
    import torch

    from misp_dpo.sae.paper import FusedDifferenceSAE
    from misp_dpo.sae.steps import PoolInputs

    dim, pairs = args.paper_dim, args.memory_pairs
    generator = torch.Generator().manual_seed(0)
    model = FusedDifferenceSAE(dim, 128)
    model.initialise(generator, torch.zeros(dim, dim), 1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dv = torch.randn(pairs, 64, dim, generator=generator) / dim**0.5
    inputs = PoolInputs(
        dv, torch.randn(pairs, dim, generator=generator) / dim**0.5, torch.ones(pairs, 64, dtype=bool)
    )
    before = peak_rss_mb()
    for _ in range(2):  # the second step runs with Adam's state already allocated
        loss = model.loss(*inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"pairs": pairs, "samples": pairs * 64, "peak_mb": peak_rss_mb(), "before_step_mb": before}


ROLES = {"topk-ours": role_topk_ours, "topk-peer": role_topk_peer, "paper": role_paper, "memory": role_memory}


def run_role(role: str, args: argparse.Namespace, extra: list[str] | None = None) -> dict:
    command = [sys.executable, __file__, "--role", role, *sys.argv[1:], *(extra or [])]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(
        f"  {role}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})}"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="D = 128, 1024 latents, batch 1024")
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--memory-pairs", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=float, default=2.0, help="topk training epochs (both trainers)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every contender")
    parser.add_argument("--paper-steps", type=int, default=4, help="paper variant steps timed at D = 512")
    args = parser.parse_args()
    args.dim, args.latents, args.k = (128, 1024, 32) if args.quick else (512, 4096, 32)
    args.batch, args.n = (1024, 50_000) if args.quick else (4096, 200_000)
    args.paper_dim, args.pairs, args.paper_batch = 512, 256 if args.quick else 1024, 4096
    import torch

    torch.set_num_threads(args.threads)
    if args.role:
        print(json.dumps({**ROLES[args.role](args), "peak_rss_mb": peak_rss_mb()}))
        return
    import torch

    print(
        f"SAE benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, CPU (shared machine)"
    )
    print(f"topk: D={args.dim}, latents={args.latents}, k={args.k}, batch={args.batch}, {args.n} vectors")
    ours, peer = run_role("topk-ours", args), run_role("topk-peer", args)
    speed = ours["samples_per_s"] / peer["samples_per_s"]
    cpu_speed = ours["samples_per_cpu_s"] / peer["samples_per_cpu_s"]
    print(f"  => throughput ours/peer {speed:.2f}x wall, {cpu_speed:.2f}x per CPU second (target >= 1.0)")
    ok = ours["fvu"] <= peer["fvu"] * 1.05
    print(f"  => held-out FVU ours {ours['fvu']:.4f} vs peer {peer['fvu']:.4f} (target <= peer + 5%: {ok})")
    print(f"paper: D={args.paper_dim}, 128 latents, pools of 64, batch {args.paper_batch} differences")
    paper = run_role("paper", args)
    print(f"  => {paper['samples_per_s']:.0f} differences/s (each a {args.paper_dim**2}-entry input)")
    print("memory of one paper training step at D = 512 (fresh process each):")
    sizes = [4, 8, 16] if args.quick else [4, 16, 32]
    probes = [run_role("memory", args, ["--memory-pairs", str(p)]) for p in sizes]
    slope = (
        (probes[-1]["peak_mb"] - probes[0]["peak_mb"])
        * 2**20
        / (probes[-1]["samples"] - probes[0]["samples"])
    )
    dim = args.paper_dim
    per_latent_d, per_d2 = 128 * dim * 4, dim * dim * 4
    print(f"  => {slope / 1024:.1f} KiB per extra sample; latents x D floats: {per_latent_d / 1024:.0f} KiB, "
          f"D^2 floats: {per_d2 / 1024:.0f} KiB ({slope / per_d2:.3f} of D^2)")  # fmt: skip


if __name__ == "__main__":
    main()
