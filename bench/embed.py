"""Benchmark: the embed stage against a raw open_clip forward loop on the same images and model.

    python bench/embed.py                      # 512 images, ViT-B-32 with random weights at 224 px
    python bench/embed.py --quick              # 96 images (a minute on a loaded 2-core machine)
    python bench/embed.py --images 2048 --model ViT-L-14 --batch-size 64 --num-workers 8

The images are JPEGs (256 x 256, smooth random content) in a folder, given to `embed` as the
corpus next to a one-row pairs table. Each contender runs in its own subprocess, so its peak RSS
(ru_maxrss) is its own. The stage's decoding workers are reported apart, as the largest one's peak
RSS: they are forked after the model is loaded, so that figure includes pages shared with the main
process (counted once in reality). To check that memory does not grow with the corpus, compare
the stage's peak RSS at two corpus sizes (`--images 500` and `--images 4000`, say):

- stage: `misp-dpo embed` end to end, one task: plan (list, hash), load the model, decode in
  DataLoader workers, sha1, encode, L2-normalise, write Parquet, manifest;
- raw: what one writes by hand: create the model, then per batch open each file with PIL,
  preprocess, stack, `encode_image`, normalise; nothing written.

Both count model creation; images/s = images embedded / wall seconds. The ratio stage/raw is the
figure of merit (target >= 0.9). Run it on a quiet machine (other processes skew either side), or
with --repeat 3, which alternates the two and keeps the fastest run of each.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def make_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        image.save(folder / f"{i:06d}.jpg", quality=90)
    (folder.parent / "pairs.csv").write_text(
        f"prompt,chosen,image\nwhat is it?,a picture,corpus/{0:06d}.jpg\n"
    )


def role_stage(args: argparse.Namespace) -> dict:
    from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
    from misp_dpo.pipelines.stages.embed import EmbedConfig, EmbedStage

    work = Path(args.work)
    out = work / "stage-out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = EmbedConfig(
        pairs=work / "pairs.csv",
        corpus=work / "corpus",
        out=out,
        model=args.model,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
    )
    started = time.perf_counter()
    manifest = run_stage(EmbedStage(), cfg, RunOptions())
    seconds = time.perf_counter() - started
    assert manifest is not None
    return {"images": manifest.stats["images"], "seconds": seconds}


def role_raw(args: argparse.Namespace) -> dict:
    import open_clip
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from misp_dpo.embed.clip import register_model_configs

    register_model_configs()  # only so that --model misp-tiny-clip names a model here too
    started = time.perf_counter()
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, device=device)
    model.eval()
    files = sorted((Path(args.work) / "corpus").glob("*.jpg"))
    embedded = 0
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
        for lo in range(0, len(files), args.batch_size):
            batch = torch.stack([preprocess(Image.open(f)) for f in files[lo : lo + args.batch_size]])
            features = F.normalize(model.encode_image(batch.to(device)).float(), dim=-1).cpu()
            embedded += len(features)
    return {"images": embedded, "seconds": time.perf_counter() - started}


def run_role(role: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--role", role, *sys.argv[1:]]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{role} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="96 images")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip name; random weights")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, alternated; the fastest counts")
    parser.add_argument("--work", default="/tmp/misp-bench-embed")
    parser.add_argument("--role", choices=["stage", "raw"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    images = 96 if args.quick else args.images
    if args.role:
        result = role_stage(args) if args.role == "stage" else role_raw(args)
        # the raw loop has no workers (its only child is a helper that importing torch runs)
        workers = peak_rss_mb(resource.RUSAGE_CHILDREN) if args.role == "stage" else 0.0
        result |= {"rss_mb": peak_rss_mb(), "workers_rss_mb": workers}
        print(json.dumps(result))
        return
    make_images(Path(args.work) / "corpus", images, args.size)
    runs: dict[str, list[dict]] = {"raw": [], "stage": []}
    for _ in range(args.repeat):  # alternated, so a busy spell on a shared machine hits both
        for role in runs:
            runs[role].append(run_role(role, args))
    raw, stage = (min(runs[role], key=lambda r: r["seconds"]) for role in ("raw", "stage"))
    for name, result in (("raw open_clip loop", raw), ("embed stage", stage)):
        rate = result["images"] / result["seconds"]
        workers = result["workers_rss_mb"]
        print(
            f"{name:>18}: {result['images']} images in {result['seconds']:.1f} s = {rate:.1f} images/s, "
            f"peak RSS {result['rss_mb']:.0f} MB"
            + (f" (largest decoding worker {workers:.0f} MB, shared pages included)" if workers else "")
        )
    ratio = (stage["images"] / stage["seconds"]) / (raw["images"] / raw["seconds"])
    setting = f"{args.model}, random weights, batch {args.batch_size}, {args.num_workers} decoding workers"
    print(f"ratio stage/raw: {ratio:.2f} (target >= 0.9) [{setting}]")


if __name__ == "__main__":
    main()
