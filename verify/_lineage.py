"""Lineage against a named foreign model: sound statistics instead of LayerNorm cosine.

Two permutation-robust matching tests on equal-shaped weight matrices (Zhu et al., ICML 2025,
"Independence Tests for Language Models"), docs/VERIFYING.md:

- constrained (``csu``): per matrix, the cosine matrix between hidden-unit rows of the two models,
  Hungarian matching, Spearman correlation of matched index vs identity, a p-value per matrix,
  combined over matrices with Fisher's method. Catches derivation without re-ordering.
- unconstrained (``match``): hidden units matched twice, through two matrices that share the hidden
  index (an MLP's up-projection rows and down-projection columns), and the two matchings
  correlated. A consistently permuted copy recovers the same permutation twice (statistic ≈ 1).

Tensors are paired by shape, in natural name order within each shape, so names may differ by prefix
(``model.layers.0.mlp.up.weight`` ↔ ``blocks.0.up.weight``). The raw LayerNorm/RMSNorm cosine is shown
with its null baseline (a ones-initialised gain vector against the foreign one) and the centred
(Pearson) value, never used as evidence.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

DERIVED_ALPHA = 1e-6  # "derived" below this, after Bonferroni over tests and foreign files
INDEPENDENT_P = 0.01  # "independent" needs every test above this, enough power, and the trajectory
MAX_UNITS = 4096  # at most this many hidden units of ours are matched per matrix (an evenly spaced subset)
MAX_FOREIGN_UNITS = 32768  # against at most this many foreign units (the cost matrix is subset × units)
MIN_UNITS = 8
MIN_MATRICES = 2
LN_SENTENCE = ("A raw LayerNorm cosine near 1 is not evidence of copying: norm gains are positive with small "
               "spread, so unrelated models score 0.95–0.99; compare it with the null baseline of a fresh init.")


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _is_norm(name: str, array: np.ndarray) -> bool:
    lowered = name.lower()
    return array.ndim == 1 and lowered.endswith("weight") and ("norm" in lowered or re.search(r"(^|\.)ln", lowered)
                                                                is not None)


def pair_by_shape(a: dict[str, np.ndarray], b: dict[str, np.ndarray], ndim: int,
                  norms_only: bool = False) -> list[tuple[str, str]]:
    """Pairs (name in a, name in b) of tensors with equal shape, k-th with k-th in natural order."""
    def groups(tensors: dict[str, np.ndarray]) -> dict[tuple[int, ...], list[str]]:
        out: dict[tuple[int, ...], list[str]] = defaultdict(list)
        for name in sorted(tensors, key=_natural):
            t = tensors[name]
            if t.ndim == ndim and (not norms_only or _is_norm(name, t)):
                out[tuple(t.shape)].append(name)
        return out

    ga, gb = groups(a), groups(b)
    return [(x, y) for shape in ga if shape in gb for x, y in zip(ga[shape], gb[shape], strict=False)]


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1, norms)


def _subset(units: int) -> np.ndarray:
    """Our hidden units that are matched: all of them, or MAX_UNITS evenly spaced ones."""
    return np.arange(units) if units <= MAX_UNITS else np.linspace(0, units - 1, MAX_UNITS).round().astype(np.int64)


def _match(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """π with row i of a matched to row π[i] of b (Hungarian, maximal total cosine; a may have
    fewer rows than b)."""
    from scipy.optimize import linear_sum_assignment

    cost = _unit(a.astype(np.float32)) @ _unit(b.astype(np.float32)).T
    rows, cols = linear_sum_assignment(cost, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def _spearman_p(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman ρ and its one-sided p-value for ρ > 0 (derivation shows as positive correlation)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0, 1.0
    result = spearmanr(x, y, alternative="greater")
    rho, p = float(result.statistic), float(result.pvalue)
    return rho, (1.0 if math.isnan(p) else p)


def fisher(p_values: list[float]) -> float:
    """Fisher's combined p-value: χ² = −2 Σ log p with 2L degrees of freedom."""
    from scipy.stats import chi2

    if not p_values:
        return 1.0
    stat = -2 * sum(math.log(max(p, 1e-300)) for p in p_values)
    return float(chi2.sf(stat, 2 * len(p_values)))


@dataclass(frozen=True, slots=True)
class Lineage:
    """The statistics for one pair of weight sets."""

    verdict: str
    p_value: float
    p_csu: float
    p_match: float
    matrices: int
    mlp_pairs: int
    reason: str
    layernorm_cosine: float | None
    layernorm_cosine_null: float | None
    layernorm_pearson: float | None
    paired: dict[str, str]

    @property
    def layernorm_note(self) -> str:
        """Why the raw LayerNorm cosine is shown but never used as evidence."""
        return LN_SENTENCE

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"verdict": self.verdict, "p_value": self.p_value, "p_csu": self.p_csu, "p_match": self.p_match,
                "matrices": self.matrices, "mlp_pairs": self.mlp_pairs, "reason": self.reason,
                "layernorm_cosine": self.layernorm_cosine, "layernorm_cosine_null": self.layernorm_cosine_null,
                "layernorm_pearson": self.layernorm_pearson}


def _mlp_pairs(names: list[str], tensors: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """(up, down) matrices of one block sharing a hidden index: within the same parent module
    (the name without its last two parts, e.g. ``blocks.0`` or ``model.layers.0.mlp``), a matrix
    of shape (h, d) paired with one of shape (d, h), h ≠ d, in natural name order."""
    blocks: dict[str, list[str]] = defaultdict(list)
    for name in names:
        blocks[name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""].append(name)
    out = []
    for members in blocks.values():
        downs = [n for n in members if tensors[n].shape[0] < tensors[n].shape[1]]
        for up in (n for n in members if tensors[n].shape[0] > tensors[n].shape[1]):
            h, d = tensors[up].shape
            down = next((n for n in downs if tensors[n].shape == (d, h)), None)
            if down is not None:
                downs.remove(down)
                out.append((up, down))
    return out


def layernorm_stats(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float | None, float | None,
                                                                                  float | None]:
    """(raw cosine, null-baseline cosine, Pearson) of all norm gains paired by shape and order."""
    pairs = pair_by_shape(a, b, 1, norms_only=True)
    if not pairs:
        return None, None, None
    x = np.concatenate([a[p].astype(np.float64) for p, _ in pairs])
    y = np.concatenate([b[q].astype(np.float64) for _, q in pairs])
    cos = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) or 1))
    null = float(y.sum() / (math.sqrt(len(y)) * (np.linalg.norm(y) or 1)))  # a ones-initialised gain vector
    pearson = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else 0.0
    return cos, null, pearson


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray], *, n_foreign: int = 1,
            trajectory_agrees: bool | None = None, progress: Any = None) -> Lineage:
    """Run both tests on two weight sets; ``trajectory_agrees`` None means no ledger (then the best
    answer for unrelated weights is "not shown to be derived"). ``progress(stage, done, total)``
    hears about each matched matrix (Hungarian matching is cubic in the hidden units)."""
    pairs = [(x, y) for x, y in pair_by_shape(a, b, 2) if MIN_UNITS <= a[x].shape[0] <= MAX_FOREIGN_UNITS]
    csu = []
    for done, (x, y) in enumerate(pairs):
        if progress:
            progress("lineage", done, len(pairs))
        rows = _subset(a[x].shape[0])
        csu.append(_spearman_p(rows, _match(a[x][rows], b[y]))[1])
    if progress:
        progress("lineage", len(pairs), len(pairs))
    order_a = [n for n in sorted(a, key=_natural) if a[n].ndim == 2]
    order_b = [n for n in sorted(b, key=_natural) if b[n].ndim == 2]
    mlp_a, mlp_b = _mlp_pairs(order_a, a), _mlp_pairs(order_b, b)
    by_shape_b: dict[tuple[tuple[int, ...], tuple[int, ...]], list[tuple[str, str]]] = defaultdict(list)
    for up, down in mlp_b:
        by_shape_b[(b[up].shape, b[down].shape)].append((up, down))
    used: dict[Any, int] = defaultdict(int)
    match_p = []
    for up, down in mlp_a:
        key = (a[up].shape, a[down].shape)
        if used[key] >= len(by_shape_b.get(key, [])) or not MIN_UNITS <= a[up].shape[0] <= MAX_FOREIGN_UNITS:
            continue
        up_b, down_b = by_shape_b[key][used[key]]
        used[key] += 1
        rows = _subset(a[up].shape[0])
        first, second = _match(a[up][rows], b[up_b]), _match(a[down].T[rows], b[down_b].T)
        match_p.append(_spearman_p(first, second)[1])
    p_csu, p_match = fisher(csu), fisher(match_p)
    tests = (1 if csu else 0) + (1 if match_p else 0)
    p_min = min(p_csu, p_match)
    corrected = min(1.0, p_min * max(tests, 1) * max(n_foreign, 1))
    ln = layernorm_stats(a, b)
    power = len(pairs) >= MIN_MATRICES
    if not pairs and not match_p:
        verdict, reason = "inconclusive", "no weight matrices of equal shape to compare"
    elif corrected < DERIVED_ALPHA:
        verdict, reason = "derived", f"matching tests reject independence (corrected p = {corrected:.2e})"
    elif not power:
        verdict, reason = "inconclusive", f"only {len(pairs)} comparable matrix(es): too little power"
    elif min(p_csu, p_match if match_p else 1.0) <= INDEPENDENT_P:
        verdict, reason = "inconclusive", f"weak evidence of relation (p = {p_min:.2g}) below the derived threshold"
    elif trajectory_agrees is None:
        verdict, reason = "not shown to be derived", "matching tests find no relation; without a ledger, " \
                                                     "independence cannot be shown"
    elif trajectory_agrees:
        verdict, reason = "independent", "matching tests find no relation and the recorded trajectory never " \
                                         "approaches the foreign weights"
    else:
        verdict, reason = "inconclusive", "matching tests find no relation but the trajectory approaches the " \
                                          "foreign weights"
    return Lineage(verdict, corrected, p_csu, p_match, len(pairs), len(match_p), reason, *ln,
                   paired=dict(pairs))


def load_numpy(path: Any) -> dict[str, np.ndarray]:
    """A safetensors file (or sharded index) as arrays, floating point ones as float32 (bf16
    widened exactly); read without torch and without unpickling."""
    from ledger._weights import read_safetensors

    return {name: a.astype(np.float32) if a.dtype.kind == "f" else a for name, a in read_safetensors(path).items()}


def trajectory(view: Any, ours: dict[str, np.ndarray], foreign: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Sketch distance of every sketched step to the foreign weights, beside the measured start
    distance d(W_0, F), and cos(W_t − W_0, F − W_0); None when the foreign weights do not cover
    every fingerprinted tensor (the logged sketches cover them all)."""
    from ledger._weights import NumpySketch

    order = view.tensor_order
    mapping: dict[str, str] = {}
    for ndim in {a.ndim for a in ours.values()}:
        mapping.update(pair_by_shape({n: ours[n] for n in order if n in ours}, foreign, ndim))
    if any(name not in mapping for name in order):
        return None
    policy = view.policy
    sketch_f = NumpySketch(policy.sketch_seed, policy.sketch_k)({name: foreign[mapping[name]] for name in order})
    start = view.init.sketch
    steps, distance, cosine = [-1], [float(np.linalg.norm(start - sketch_f))], [0.0]
    toward = sketch_f - start
    for s in sorted(view.steps):
        sketch = view.steps[s].sketch
        if sketch is not None:
            moved = sketch - start
            steps.append(s)
            distance.append(float(np.linalg.norm(sketch - sketch_f)))
            denominator = np.linalg.norm(moved) * np.linalg.norm(toward)
            cosine.append(float(moved @ toward / denominator) if denominator else 0.0)
    baseline = distance[0]
    min_ratio = min(distance) / baseline if baseline else 0.0
    exact = _exact_at_checkpoints(view, mapping, foreign)
    return {"steps": steps, "distance": distance, "baseline": baseline, "min_ratio": min_ratio,
            "final_cos": cosine[-1], "cosine": cosine, "checkpoints": exact,
            "agrees": baseline > 0 and min_ratio >= 0.5 and cosine[-1] < 0.5
            and all(c["cos_matrices"] is None or c["cos_matrices"] < 0.5 for c in exact)}


def _exact_at_checkpoints(view: Any, mapping: dict[str, str], foreign: dict[str, np.ndarray],
                          limit: int = 16) -> list[dict[str, Any]]:
    """Exact ‖W_t − F‖ at stored checkpoints (at most ``limit``, evenly spread), and
    cos(W_t − W₀, F − W₀) over the weight matrices when the init checkpoint is stored."""
    stored = [cp for cp in view.stored_checkpoints() if (cp.directory / "model.safetensors").is_file()]
    if len(stored) > limit:
        stored = [stored[round(i * (len(stored) - 1) / (limit - 1))] for i in range(limit)]
    init = next((cp for cp in stored if cp.step == -1), None)
    w0 = load_numpy(init.directory / "model.safetensors") if init is not None else None
    out = []
    for cp in stored:
        weights = load_numpy(cp.directory / "model.safetensors")
        diff = [weights[n].astype(np.float64) - foreign[f] for n, f in mapping.items() if n in weights]
        entry: dict[str, Any] = {"step": cp.step, "distance": float(np.sqrt(sum(np.square(d).sum() for d in diff))),
                                 "cos_matrices": None}
        if w0 is not None and cp.step != -1:
            names = [n for n, f in mapping.items() if n in weights and weights[n].ndim == 2 and n in w0]
            moved = np.concatenate([(weights[n] - w0[n]).ravel() for n in names]) if names else np.zeros(0)
            toward = np.concatenate([(foreign[mapping[n]] - w0[n]).ravel() for n in names]) if names else np.zeros(0)
            denominator = float(np.linalg.norm(moved) * np.linalg.norm(toward))
            entry["cos_matrices"] = float(moved @ toward / denominator) if denominator else 0.0
        out.append(entry)
    return out


def compare_files(first: str | os.PathLike[str], second: str | os.PathLike[str]) -> Lineage:
    """Test whether two weight files (safetensors, or sharded ``*.index.json``) are related, from
    the weights alone: "derived" or "not shown to be derived" (without a ledger, independence
    cannot be shown)."""
    return compare(load_numpy(first), load_numpy(second))
