"""GPU check: run and time every CUDA path of misp-dpo on an NVIDIA GPU, and fail if CUDA is not used.

    python bench/gpu_check.py                  # on a GPU machine: full sizes, meant for < 8 min on an H200
    python bench/gpu_check.py --cpu-smoke      # tiny sizes on the CPU: the same code, for CI and laptops
    python bench/gpu_check.py --only faiss,sae # some of: embed, faiss, sae, train

Checks (full sizes):
- embed: the embed stage with ViT-B-32 (random weights) on a generated corpus, against a raw open_clip
  forward loop (bf16 autocast) over the same preprocessed images: images/s and their ratio;
- faiss: exact search of 100k queries, k = 64, over a generated 10M x 768 float16 corpus through
  misp-dpo's `Searcher` (the candidates stage's index on all GPUs) and through a raw FAISS
  `GpuIndexFlatIP` storing float16, against FAISS on the CPU over a 1M sample; recall of each;
- sae: training samples/s of both SAE variants at D = 768;
- train: one MISP-DPO optimizer step (forward, backward, AdamW) of a randomly initialised mid-size
  LLaVA (`tiny-2048x16`, about 0.6B parameters) with LoRA in bf16.
Prints a table, writes JSON (--json), and exits 1 when a check failed or ran without CUDA; without a
GPU (and without --cpu-smoke) it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared fixtures: tests.helpers

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Sizes:
    images: int = 4096  # generated corpus for embed (and the trainer's images)
    embed_model: str = "ViT-B-32"
    embed_batch: int = 256
    faiss_n: int = 10_000_000
    faiss_dim: int = 768
    faiss_queries: int = 100_000
    faiss_k: int = 64
    cpu_sample_n: int = 1_000_000
    cpu_sample_queries: int = 1_000
    sae_dim: int = 768
    sae_pairs: int = 50_000
    sae_pool: int = 64
    sae_images: int = 200_000
    sae_steps: int = 300
    vlm: str = "tiny-2048x16"
    train_pairs: int = 16


SMOKE = Sizes(
    images=48,
    embed_model="misp-tiny-clip",
    embed_batch=16,
    faiss_n=20_000,
    faiss_dim=64,
    faiss_queries=512,
    faiss_k=16,
    cpu_sample_n=5_000,
    cpu_sample_queries=128,
    sae_dim=32,
    sae_pairs=256,
    sae_pool=8,
    sae_images=1_000,
    sae_steps=5,
    vlm="tiny",
    train_pairs=4,
)


@dataclass
class Row:
    """One measured figure; `cuda`: whether the work provably ran on the GPU (None: a CPU reference)."""

    check: str
    metric: str
    value: float
    unit: str
    cuda: bool | None
    reference: float | None = None  # the same figure for the reference measured in this run
    note: str = ""
    ratio: float | None = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = self.value / self.reference if self.reference else None


def synchronize(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def unit_vectors(n: int, dim: int, seed: int, cuda: bool, chunk: int = 1 << 20) -> np.ndarray:
    """(n, dim) float16 random unit vectors, generated on the GPU when there is one (10M x 768 in seconds)."""
    import torch

    device = "cuda" if cuda else "cpu"
    generator = torch.Generator(device=device).manual_seed(seed)
    out = np.empty((n, dim), dtype=np.float16)
    for lo in range(0, n, chunk):
        block = torch.randn(min(chunk, n - lo), dim, device=device, generator=generator)
        block = torch.nn.functional.normalize(block, dim=1).half()
        out[lo : lo + len(block)] = block.cpu().numpy()
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the true k neighbours found, per query."""
    hits = [len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / truth.shape[1]


def timed(function: Callable[[], Any], cuda: bool) -> tuple[Any, float]:
    synchronize(cuda)
    started = time.perf_counter()
    result = function()
    synchronize(cuda)
    return result, time.perf_counter() - started


def check_faiss(size: Sizes, cuda: bool, work: Path) -> list[Row]:
    """misp-dpo's Searcher against raw FAISS fp16 on the GPU and FAISS on the CPU over a sample."""
    import faiss

    from misp_dpo.mining.index import IndexSpec, Searcher, build_index

    if cuda and faiss.get_num_gpus() == 0:
        raise RuntimeError("FAISS sees no GPU: install faiss-gpu (pip install 'misp-dpo[gpu]')")
    n, dim, k, device = size.faiss_n, size.faiss_dim, size.faiss_k, "cuda" if cuda else "cpu"
    corpus, generate_s = timed(lambda: unit_vectors(n, dim, 0, cuda), cuda)
    queries = unit_vectors(size.faiss_queries, dim, 1, cuda).astype(np.float32)
    spec = IndexSpec("Flat")
    cpu_index, build_s = timed(lambda: build_index(corpus, spec), False)
    (ours, ours_s), ours_on_gpu = search_all(Searcher(cpu_index, spec, device, k), queries, k, cuda)
    del cpu_index  # only the searcher's GPU clone was needed
    work_units = len(queries) * n / 1e9  # billions of query-vector products
    raw_s, agreement = raw_fp16_search(corpus, queries, k, ours) if cuda else (None, None)

    sample = corpus[: size.cpu_sample_n].astype(np.float32)
    few = queries[: size.cpu_sample_queries]
    cpu = faiss.IndexFlatIP(dim)
    cpu.add(sample)
    (_, truth), cpu_s = timed(lambda: cpu.search(few, k), False)
    cpu_rate = len(few) * len(sample) / 1e9 / cpu_s
    sample_recall = recall(Searcher(cpu, spec, device, k).search(few, k)[1], truth)
    rows = [
        Row("faiss", f"corpus {n:,} x {dim} float16 generated", generate_s, "s", cuda),
        Row("faiss", "misp-dpo exact index built (CPU, float32)", build_s, "s", None),
        Row(
            "faiss",
            f"misp-dpo Searcher, {len(queries):,} queries, k={k} (vs raw fp16)",
            work_units / ours_s,
            "Gqv/s",
            cuda and ours_on_gpu,
            reference=work_units / raw_s if raw_s else None,
            note=f"{ours_s:.1f} s, {work_units / ours_s / cpu_rate:.0f}x faiss-cpu; "
            f"recall@{k} vs CPU exact on the sample {sample_recall:.4f}",
        ),
        Row("faiss", f"faiss-cpu exact, {len(few):,} q x {len(sample):,} sample", cpu_rate, "Gqv/s", None),
    ]
    if raw_s is not None:
        note = f"{raw_s:.1f} s; recall@{k} vs misp-dpo {agreement:.4f}"
        rows.append(
            Row("faiss", "raw GpuIndexFlatIP, float16 storage", work_units / raw_s, "Gqv/s", True, note=note)
        )
    return rows


def search_all(
    searcher: Any, queries: np.ndarray, k: int, cuda: bool
) -> tuple[tuple[np.ndarray, float], bool]:
    """(neighbour ids, seconds) of every query after a warm-up, and whether the index was on the GPU."""
    searcher.search(queries[:256], k)
    (_, ids), seconds = timed(lambda: searcher.search(queries, k), cuda)
    return (ids, seconds), searcher.on_gpu


def raw_fp16_search(corpus: np.ndarray, queries: np.ndarray, k: int, ours: np.ndarray) -> tuple[float, float]:
    """The anchor: FAISS's own GpuIndexFlatIP storing float16, one search call for all queries.

    Returns its seconds and its recall@k against misp-dpo's results on the first 1000 queries.
    """
    import faiss

    resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.device = 0
    config.useFloat16 = True
    index = faiss.GpuIndexFlatIP(resources, corpus.shape[1], config)
    for lo in range(0, len(corpus), 1 << 20):
        index.add(np.ascontiguousarray(corpus[lo : lo + (1 << 20)], dtype=np.float32))
    index.search(queries[:256], k)  # warm-up
    (_, raw), raw_s = timed(lambda: index.search(queries, k), True)
    return raw_s, recall(raw[:1000], ours[:1000])


def check_sae(size: Sizes, cuda: bool, work: Path) -> list[Row]:
    """Training samples/s of both variants on generated unit vectors (fp32 training, as the stage)."""
    import torch

    from misp_dpo.sae.data import PoolChunk, VectorChunk, in_memory
    from misp_dpo.sae.trainer import TrainSettings, train_sae

    rng = np.random.default_rng(0)
    dim, pairs = size.sae_dim, size.sae_pairs
    images = unit_vectors(size.sae_images, dim, 2, cuda)
    positive = images[rng.integers(0, len(images), pairs)]
    prompts = unit_vectors(pairs, dim, 3, cuda)
    candidates = rng.integers(0, len(images), (pairs, size.sae_pool))
    heldout = np.arange(pairs) % 50 == 0
    datasets = {
        "paper": in_memory(PoolChunk(positive, prompts, candidates), heldout, images),
        "topk": in_memory(VectorChunk(images), np.arange(len(images)) % 50 == 0),
    }
    rows = []
    for variant, dataset in datasets.items():
        settings = TrainSettings(
            variant=variant, steps=size.sae_steps, device="cuda" if cuda else "cpu", log_every=50
        )
        result, seconds = timed(lambda s=settings, d=dataset: train_sae(d, s), cuda)
        on_gpu = next(result.model.parameters()).is_cuda
        resolved = result.settings
        note = f"{resolved.steps} steps of {resolved.batch_size}, {resolved.latents} latents"
        note += f", {seconds:.1f} s with stats and evaluation"
        value = result.throughput / 1e6  # training steps only: no input scan, no evaluation
        rows.append(Row("sae", f"{variant} SAE training, D={dim}", value, "M samples/s", on_gpu, note=note))
        del result
        if cuda:
            torch.cuda.empty_cache()
    return rows


def check_train(size: Sizes, cuda: bool, work: Path) -> list[Row]:
    """One optimizer step of MISP-DPO (all negatives) on a random mid-size LLaVA, after a warm-up step."""
    import torch

    from misp_dpo.dpo.data import PreferenceData
    from misp_dpo.dpo.distributed import DistInfo
    from misp_dpo.dpo.loop import LoopConfig, backward_step, make_optimizer, optimizer_step
    from misp_dpo.dpo.losses import LossConfig
    from misp_dpo.dpo.model import ModelConfig, load_policy
    from misp_dpo.dpo.reference import align_reference, compute_reference
    from misp_dpo.dpo.trainer import build_state
    from misp_dpo.pipelines.io import read_table
    from tests.helpers import write_negatives

    negatives = work / "negatives"
    if not (negatives / "manifest.json").is_file():
        write_negatives(negatives, synth_corpus(work, size), pairs=size.train_pairs, negatives=4, pool=8)
    data = PreferenceData(read_table(sorted(negatives.glob("train-*.parquet"))), negatives)
    policy = load_policy(size.vlm, ModelConfig(device="cuda" if cuda else "cpu"), seed=0)
    table, _ = compute_reference(policy, data, np.arange(len(data)), 32, show_progress=False)
    reference = align_reference(table, data)
    loop = LoopConfig(batch_size=4, max_steps=3)
    rows = reference.trainable(data.counts)
    state = build_state(policy, data, reference, rows, LossConfig(), loop, 0, DistInfo())
    optimizer, scheduler = make_optimizer(state, loop.max_steps)

    def step(i: int) -> None:
        backward_step(state, i)
        optimizer_step(state, optimizer, scheduler)

    _, first_s = timed(lambda: step(0), cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _, step_s = timed(lambda: [step(i) for i in (1, 2)], cuda)
    params = sum(p.numel() for p in policy.model.parameters()) / 1e6
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    dtype = next(policy.model.parameters()).dtype
    note = f"{params:.1f}M parameters, {dtype}, LoRA, 4 pairs x (2 + 4) sequences; "
    note += f"first step {first_s:.2f} s; CUDA peak {peak:.1f} GiB"
    on_gpu = policy.device.type == "cuda" and next(policy.model.parameters()).is_cuda
    return [
        Row("train", f"MISP-DPO optimizer step, {size.vlm}", 1000 * step_s / 2, "ms/step", on_gpu, note=note)
    ]


def synth_corpus(work: Path, size: Sizes) -> Path:
    """The demo corpus (generated images with captions and preference pairs), made once under --work."""
    from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
    from misp_dpo.pipelines.stages.synth import SynthConfig, SynthStage

    corpus = work / f"synth-{size.images}"
    if not (corpus / "manifest.json").is_file():
        run_stage(SynthStage(), SynthConfig(out=corpus, n=size.images, seed=0), RunOptions())
    return corpus


def check_embed(size: Sizes, cuda: bool, work: Path) -> list[Row]:
    """The embed stage (decoding workers, dedup, images and texts, Parquet) against a raw forward loop."""
    import torch

    from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
    from misp_dpo.pipelines.stages.embed import EmbedConfig, EmbedStage

    corpus = synth_corpus(work, size)
    cfg = EmbedConfig(
        pairs=corpus / "pairs.parquet",
        out=work / "embeddings",
        model=size.embed_model,
        batch_size=size.embed_batch,
        device="cuda" if cuda else "cpu",
        num_workers=max(1, min(8, (os.cpu_count() or 2) - 2)),
    )
    run_stage(EmbedStage(), cfg, RunOptions(overwrite=True, workers=1))  # warm-up: CUDA, cuDNN, page cache
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    manifest, stage_s = timed(
        lambda: run_stage(EmbedStage(), cfg, RunOptions(overwrite=True, workers=1)), cuda
    )
    stage_on_gpu = cuda and torch.cuda.max_memory_allocated() > 0
    images = manifest.rows("images")
    raw_s, raw_on_gpu = raw_forward_loop(size, cuda, corpus, images)
    note = f"{images} images + {manifest.rows('pairs')} pairs (prompt + chosen texts) in {stage_s:.1f} s, "
    note += "model load and Parquet writes included"
    return [
        Row(
            "embed",
            f"embed stage, {size.embed_model} random weights",
            images / stage_s,
            "images/s",
            stage_on_gpu,
            reference=images / raw_s,
            note=note,
        ),
        Row(
            "embed",
            "raw open_clip forward loop, preprocessed images",
            images / raw_s,
            "images/s",
            raw_on_gpu,
            note="bf16 autocast on CUDA, float32 on CPU; decoding and preprocessing not timed",
        ),
    ]


def raw_forward_loop(size: Sizes, cuda: bool, corpus: Path, count: int) -> tuple[float, bool]:
    """Seconds to encode `count` already preprocessed corpus images, batch by batch, as the stage does."""
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    from misp_dpo.embed.clip import register_model_configs

    register_model_configs()
    device = "cuda" if cuda else "cpu"
    model = open_clip.create_model(size.embed_model, pretrained=None, device=device).eval()
    transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    paths = sorted((corpus / "images").rglob("*.png"))[:count]
    pixels = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
    if cuda:
        pixels = pixels.pin_memory()

    @torch.inference_mode()
    def encode_all() -> None:
        for lo in range(0, len(pixels), size.embed_batch):
            batch = pixels[lo : lo + size.embed_batch].to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                features = model.encode_image(batch)
            torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    encode_all()  # warm-up
    _, seconds = timed(encode_all, cuda)
    return seconds * count / len(pixels), cuda and next(model.parameters()).is_cuda


SECTIONS: dict[str, Callable[[Sizes, bool, Path], list[Row]]] = {
    "embed": check_embed,
    "faiss": check_faiss,
    "sae": check_sae,
    "train": check_train,
}


def render(rows: list[Row], smoke: bool) -> str:
    lines = [f"{'check':<6} {'metric':<62} {'value':>10} {'unit':<12} {'ref':>9} {'ratio':>7} {'cuda':>5}"]
    for r in rows:
        ref = f"{r.reference:>9.3g}" if r.reference else " " * 9
        ratio = f"{r.ratio:>7.2f}" if r.ratio else " " * 7
        cuda = {True: "yes", False: "cpu" if smoke else "NO", None: "-"}[r.cuda]
        lines.append(
            f"{r.check:<6} {r.metric[:62]:<62} {r.value:>10.4g} {r.unit:<12} {ref} {ratio} {cuda:>5}"
        )
        if r.note:
            lines.append(f"{'':<6}   {r.note}")
    return "\n".join(lines)


def environment(cuda: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": cuda, "cpus": os.cpu_count()}
    if cuda:
        info |= {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
    try:
        import faiss

        info |= {"faiss": faiss.__version__, "faiss_gpus": faiss.get_num_gpus()}
    except ImportError:
        info["faiss"] = None
    return info


def run_sections(names: list[str], size: Sizes, cuda: bool, work: Path) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    failures: list[str] = []
    for name in names:
        started = time.perf_counter()
        try:
            rows += SECTIONS[name](size, cuda, work)
        except Exception as error:  # a check that breaks is reported and fails the run, the others go on
            traceback.print_exc()
            failures.append(f"{name}: {type(error).__name__}: {error}")
        print(f"[gpu_check] {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return rows, failures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (no GPU needed)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated checks to run")
    parser.add_argument("--json", default="gpu_check.json", help="where to write the results")
    parser.add_argument("--work", default="/tmp/misp-gpu-check", help="scratch folder (generated corpus)")
    parser.add_argument("--faiss-n", type=int, default=0, help="FAISS corpus size (default: 10M, smoke 20k)")
    args = parser.parse_args()
    import torch

    from misp_dpo.log import configure_logging

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "gpu_check: torch sees no CUDA GPU (torch.cuda.is_available() is False), so there is no GPU path "
            "to check here. Run it on a machine with an NVIDIA GPU and a CUDA build of torch, or run "
            "`python bench/gpu_check.py --cpu-smoke` for the same code at tiny sizes on the CPU.",
            file=sys.stderr,
        )
        sys.exit(2)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown check(s) {unknown}; choose from {list(SECTIONS)}")
    cuda = not args.cpu_smoke
    configure_logging("text", level=30)  # warnings only: the table is the output
    work = Path(args.work) / ("smoke" if args.cpu_smoke else "gpu")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    size = SMOKE if args.cpu_smoke else Sizes()
    if args.faiss_n:
        size = replace(size, faiss_n=args.faiss_n, cpu_sample_n=min(size.cpu_sample_n, args.faiss_n))
    rows, failures = run_sections(names, size, cuda, work)
    seconds = time.perf_counter() - started
    if cuda:
        failures += [f"{r.check}: {r.metric}: ran WITHOUT CUDA" for r in rows if r.cuda is False]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(render(rows, args.cpu_smoke))
    print(f"total {seconds:.0f} s, peak RSS {rss:.1f} GiB, mode {'cpu-smoke' if args.cpu_smoke else 'gpu'}")
    report = {"environment": environment(cuda), "seconds": seconds, "peak_rss_gib": rss}
    report |= {"rows": [asdict(r) for r in rows], "failures": failures}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
