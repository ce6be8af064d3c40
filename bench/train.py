"""Benchmark: a MISP-DPO step with all N = 8 negatives (exact) against M = 2 sampled ones (IS).

    python bench/train.py                 # tiny and tiny-512x4 (hidden 512, 4 layers), 10 timed steps
    python bench/train.py --quick         # tiny only, 4 timed steps
    python bench/train.py --text-weight 0 # the image term alone (no rejected-response forward)

A 240-image demo corpus and a negatives/ folder with 8 negatives per pair are written once under
--work. Each (model, mode) runs in its own subprocess, so its peak RSS (ru_maxrss) and CUDA peak are
its own. A step is the real loop's `backward_step` + `optimizer_step` on `--batch-size` pairs (16:
a real per-device batch; at 4 pairs the tiny model's per-call overheads hide what sampling saves):
loading and processing images, one forward of every sequence, backward, AdamW. Times are medians
over the timed steps; on a shared machine wall time swings with other processes, so CPU time
(process_time, one torch thread by default) is printed too. Also timed, as the anchor of what the
model itself costs: `raw cpu`, the model's forward + backward on one step's sequences already
collated (no image decoding, no processor, no loss bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared fixtures: tests.helpers

MODES = {"exact N=8": 0, "sampled M=2": 2}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def prepare(work: Path, pairs: int) -> Path:
    from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
    from misp_dpo.pipelines.runtime.validate import validate_output
    from misp_dpo.pipelines.stages.synth import SynthConfig, SynthStage
    from tests.helpers import write_negatives

    corpus, negatives = work / "corpus", work / f"negatives-{pairs}x8"

    def stale(folder: Path) -> bool:  # missing, or left by another version of the toolkit
        return not (folder / "manifest.json").is_file() or bool(validate_output(folder)[0])

    if stale(corpus):
        shutil.rmtree(corpus, ignore_errors=True)
        run_stage(SynthStage(), SynthConfig(out=corpus, n=240, seed=0), RunOptions())
    if stale(negatives):
        shutil.rmtree(negatives, ignore_errors=True)
        write_negatives(negatives, corpus, pairs=pairs, negatives=8, pool=24)
    return negatives


def _sync(device: object) -> None:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize()


def role_measure(args: argparse.Namespace) -> dict:
    """Time `args.steps` steps of one (model, mode) after 2 warm-up steps; raw forward+backward too."""
    import torch

    from misp_dpo.dpo.data import PreferenceData
    from misp_dpo.dpo.distributed import DistInfo
    from misp_dpo.dpo.loop import LoopConfig, backward_step, make_optimizer, optimizer_step
    from misp_dpo.dpo.losses import LossConfig
    from misp_dpo.dpo.model import ModelConfig, load_policy
    from misp_dpo.dpo.reference import align_reference, compute_reference
    from misp_dpo.dpo.sequences import collate, sequence_logps
    from misp_dpo.dpo.step import draw_for, pair_sequences
    from misp_dpo.dpo.trainer import build_state
    from misp_dpo.pipelines.io import read_table

    torch.set_num_threads(args.threads)
    negatives = Path(args.negatives)
    data = PreferenceData(read_table(sorted(negatives.glob("train-*.parquet"))), negatives)
    policy = load_policy(args.model, ModelConfig(device=args.device), seed=0)
    table, _ = compute_reference(policy, data, np.arange(len(data)), 64, show_progress=False)
    reference = align_reference(table, data)
    loop = LoopConfig(batch_size=args.batch_size, sample_negatives=args.sample, max_steps=args.steps + 2)
    loss = LossConfig(text_weight=args.text_weight)
    state = build_state(policy, data, reference, reference.trainable(data.counts), loss, loop, 0, DistInfo())
    optimizer, scheduler = make_optimizer(state, loop.max_steps)
    if policy.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_times, step_cpu = [], []
    for step in range(loop.max_steps):
        _sync(policy.device)
        started, cpu = time.perf_counter(), time.process_time()
        backward_step(state, step)
        optimizer_step(state, optimizer, scheduler)
        _sync(policy.device)
        step_times.append(time.perf_counter() - started)
        step_cpu.append(time.process_time() - cpu)
    step_s = float(np.median(step_times[2:]))  # the median resists other processes' bursts
    # raw: the same kind of batch, pre-encoded, through the model and back, nothing else
    rows = state.rows[: args.batch_size]
    draw = draw_for(data, rows, state.plan, 0)
    encoded, *_ = pair_sequences(data.records(rows), draw, state.encoder, data, args.text_weight > 0)
    dtype = next(policy.model.parameters()).dtype
    batch = collate([encoded], state.encoder.tokenizer.pad_token_id or 0).to(policy.device, dtype)
    raw_times, raw_cpu = [], []
    for _ in range(args.steps + 2):
        _sync(policy.device)
        started, cpu = time.perf_counter(), time.process_time()
        sequence_logps(policy.model, batch).sum().backward()
        _sync(policy.device)
        raw_times.append(time.perf_counter() - started)
        raw_cpu.append(time.process_time() - cpu)
    raw_s = float(np.median(raw_times[2:]))
    cuda_gb = torch.cuda.max_memory_allocated() / 2**30 if policy.device.type == "cuda" else 0.0
    params = sum(p.numel() for p in policy.model.parameters())
    return {
        "step_s": step_s,
        "raw_s": raw_s,
        "step_cpu_s": float(np.median(step_cpu[2:])),
        "raw_cpu_s": float(np.median(raw_cpu[2:])),
        "sequences": mean_sequences(state, loop.max_steps, args.text_weight > 0),
        "raw_sequences": len(encoded),
        "params_m": params / 1e6,
        "rss_gb": peak_rss_gb(),
        "cuda_gb": cuda_gb,
        "device": str(policy.device),
    }


def mean_sequences(state: object, steps: int, text: bool) -> float:
    """Sequences forwarded per step, averaged over the run (draws with replacement repeat images)."""
    from misp_dpo.dpo.loop import global_batch
    from misp_dpo.dpo.step import draw_for

    total = 0
    for step in range(steps):
        rows = global_batch(state.rows, step, state.loop.batch_size, state.plan.seed)
        draw = draw_for(state.data, rows, state.plan, step)
        total += len(rows) * (2 if text else 1) + int((draw.index >= 0).sum())
    return total / steps


def run_child(args: argparse.Namespace, model: str, sample: int, negatives: Path) -> dict:
    command = [sys.executable, __file__, "--role", "measure", "--model", model, "--sample", str(sample)]
    command += [
        "--negatives",
        str(negatives),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
    ]
    command += [
        "--text-weight",
        str(args.text_weight),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{model} M={sample} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model only, 4 timed steps")
    parser.add_argument("--models", default="tiny,tiny-512x4", help="comma-separated --model specs")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    parser.add_argument("--pairs", type=int, default=32, help="pairs in the generated dataset")
    parser.add_argument("--text-weight", type=float, default=1.0, help="0: image term only")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per measurement")
    parser.add_argument("--work", default="/tmp/misp-bench-train", help="where the demo data is cached")
    parser.add_argument("--role", default="main", choices=["main", "measure"], help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--sample", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--negatives", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "measure":
        print(json.dumps(role_measure(args)))
        return
    if args.quick:
        args.models, args.steps = "tiny", 4
    negatives = prepare(Path(args.work), args.pairs)
    print(
        f"step = {args.batch_size} pairs, text weight {args.text_weight}, {args.steps} timed steps (medians)"
    )
    print(
        f"{'model':<12} {'mode':<12} {'seqs':>5} {'wall ms':>9} {'cpu ms':>9} {'raw cpu':>8} {'rss GB':>7} "
        f"{'cuda GB':>8} {'speed-up wall':>13} {'speed-up cpu':>12}"
    )
    for model in args.models.split(","):
        results = {mode: run_child(args, model, m, negatives) for mode, m in MODES.items()}
        exact = results["exact N=8"]
        for mode, r in results.items():
            times = f"{1000 * r['step_s']:>9.1f} {1000 * r['step_cpu_s']:>9.1f} {1000 * r['raw_cpu_s']:>8.1f}"
            memory = f"{r['rss_gb']:>7.2f} {r['cuda_gb']:>8.2f}"
            ratios = (
                f"{exact['step_s'] / r['step_s']:>12.2f}x {exact['step_cpu_s'] / r['step_cpu_s']:>11.2f}x"
            )
            print(f"{model:<12} {mode:<12} {r['sequences']:>5.1f} {times} {memory} {ratios}")
        print(
            f"  ({model}: {exact['params_m']:.1f}M parameters, {exact['device']}, {args.threads} thread(s))"
        )


if __name__ == "__main__":
    main()
