"""Variance of the importance-sampled image loss and its gradient under the three `train --proposal`s.

    .venv/bin/python bench/proposal.py [--pairs 2000] [--negatives 8] [--noise 0.5]

On planted pools (a_i a non-linear function of mined-like fields plus noise, outside the fitted
family; the same construction as tests/dpo/test_fitted_proposal.py) it fits q_phi on held-out pairs
(`misp_dpo.dpo.sampling.FittedProposal`, as `train --proposal fitted` does on the model's a_i) and
then, for M = 1 and 2 draws with replacement, enumerates every draw sequence of every test pair to
give exactly, averaged over pairs:
- Var(S^)/S^2, the relative variance of the estimated PL denominator S = sum_i exp(a_i);
- the loss L^ = log(1 + S^): its variance and its bias against the exact loss (Jensen);
- the gradient dL^/da (N numbers, what back-propagates into the model): E|g - E g|^2 and |E g - g_exact|.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from misp_dpo.dpo.sampling import FittedProposal, restricted_proposal  # noqa: E402


def planted(pairs: int, n: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(fields (B, N, F) in sampling.FEATURES order, a (B, N))."""
    rng = np.random.default_rng(seed)
    recon, dev = rng.gamma(2.0, 1.0, (pairs, n)), rng.gamma(2.0, 1.0, (pairs, n))
    sim = rng.uniform(0.3, 0.9, (pairs, n))
    score = recon / recon.max(1, keepdims=True) + dev / dev.max(1, keepdims=True)
    q = np.exp(score)
    q = 0.4 * q / q.sum(1, keepdims=True)
    fields = np.stack(
        [q, score, recon, dev, sim, rng.uniform(-1, 1, (pairs, n)), np.zeros((pairs, n))], axis=2
    )
    a = 3.0 * np.tanh(2.0 * (score - 1.0)) + 32.0 * (sim - 0.6) ** 2 + noise * rng.standard_normal((pairs, n))
    return fields, a - 2.0  # shifted so that exp(a) and 1 are comparable in log(1 + S)


def moments(a: np.ndarray, q: np.ndarray, m: int) -> tuple[float, float, float, float, float]:
    """(Var S^/S^2, Var L^, bias L^, E|g - Eg|^2, |Eg - g_exact|) of one pair, by enumeration."""
    n = len(a)
    s_exact = np.exp(a).sum()
    loss_exact = np.log1p(s_exact)
    grad_exact = np.exp(a) / (1.0 + s_exact)
    s_values, losses, grads, probs = [], [], [], []
    for draws in itertools.product(range(n), repeat=m):
        distinct, counts = np.unique(draws, return_counts=True)
        w = counts / (m * q[distinct])
        s_hat = float((w * np.exp(a[distinct])).sum())
        g = np.zeros(n)
        g[distinct] = w * np.exp(a[distinct]) / (1.0 + s_hat)
        s_values.append(s_hat)
        losses.append(np.log1p(s_hat))
        grads.append(g)
        probs.append(float(np.prod(q[list(draws)])))
    p = np.array(probs)
    s_arr, l_arr, g_arr = np.array(s_values), np.array(losses), np.array(grads)
    var_s = float(p @ (s_arr - s_exact) ** 2) / s_exact**2
    mean_l = float(p @ l_arr)
    mean_g = p @ g_arr
    var_g = float(p @ ((g_arr - mean_g) ** 2).sum(axis=1))
    return (
        var_s,
        float(p @ (l_arr - mean_l) ** 2),
        mean_l - loss_exact,
        var_g,
        float(np.linalg.norm(mean_g - grad_exact)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=2000, help="test pairs")
    parser.add_argument("--fit-pairs", type=int, default=64, help="held-out pairs q_phi is fitted on")
    parser.add_argument("--negatives", type=int, default=8, help="N stored negatives per pair")
    parser.add_argument("--noise", type=float, default=0.5, help="std of the noise in a_i")
    args = parser.parse_args()
    n = args.negatives
    fit_fields, fit_a = planted(args.fit_pairs, n, 0, args.noise)
    fields, a = planted(args.pairs, n, 1, args.noise)
    fitted = FittedProposal.for_data(fit_fields, np.full(args.fit_pairs, n))
    fitted.fit(fit_fields, np.full(args.fit_pairs, n), fit_a)
    proposals = {
        "uniform": np.full(a.shape, 1.0 / n),
        "dataset": np.stack([restricted_proposal(f, n, "dataset") for f in fields[..., 0]]),
        "fitted": fitted.probabilities(fields, np.full(args.pairs, n)),
    }
    print(f"{args.pairs} planted pairs, N = {n}, noise {args.noise}; q_phi fitted on {args.fit_pairs} others")
    print(f"fitted w over {', '.join(f'{v:+.2f}' for v in fitted.w)} (sampling.FEATURES order)")
    print(
        f"{'M':>2} {'proposal':9s} {'Var S^/S^2':>11s} {'Var loss':>10s} {'loss bias':>10s} "
        f"{'Var grad':>10s} {'|grad bias|':>11s}"
    )
    for m in (1, 2):
        for name, q in proposals.items():
            stats = np.array([moments(a[b], q[b], m) for b in range(args.pairs)]).mean(axis=0)
            print(
                f"{m:2d} {name:9s} {stats[0]:11.4f} {stats[1]:10.5f} {stats[2]:+10.5f} {stats[3]:10.5f} "
                f"{stats[4]:11.5f}"
            )


if __name__ == "__main__":
    main()
