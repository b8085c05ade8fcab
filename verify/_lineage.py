"""Lineage against a named foreign model: sound statistics instead of LayerNorm cosine.

Permutation-robust matching tests on equal-shaped weight matrices (Zhu et al., ICML 2025,
"Independence Tests for Language Models"), docs/VERIFYING.md, after the residual stream is aligned:

- residual alignment: the residual width d is the length of the norm gains (else the commonest
  matrix axis). Tensors outside numbered blocks with one axis of width d (token and position
  embeddings, an untied output head) have their other axis indexed by something both models share in
  order (token and position ids); their centred columns are matched across the models (Hungarian on
  the summed cosines), giving the foreign residual coordinate π_res(i) of each of ours. Every other
  axis of width d in a compared matrix is then read through π_res: a copy whose residual stream was
  consistently permuted is expressed in our basis again. Without such tensors nothing is aligned (and
  the reason says that a residual-permuted copy would go unseen).
- units: every other compared matrix with exactly one axis of width d has its other axis as units
  (hidden units of an MLP, attention output channels). Matrices in the same numbered block (``h.3``,
  ``encoder.layer.3``, ``model.layers.3``; a trailing ``Sequential`` index not counted) with the same
  number of units share them: an MLP's up-projection rows and down-projection columns, whatever the
  names, the Conv1D (in, out) layout included. Square d×d matrices are left out: which of their axes
  is the residual stream cannot be told from the shape.
- constrained (``csu``): per unit group, our units matched to the foreign ones on all the group's
  matrices at once (Hungarian on the summed cosines, residual aligned), Spearman correlation of matched
  index vs identity; and the residual matching π_res vs identity. Catches derivation without
  re-ordering of units. The embedding-like tensors' rows are not tested: π_res was fitted on them, so
  after alignment their rows agree more than chance even for independent models.
- unconstrained (``match``): per unit group with both orientations, units matched twice — through the
  (units, d) matrices (up-projection rows) and through the (d, units) ones (down-projection columns) —
  and the two matchings correlated. A permuted copy recovers the same permutation twice.

Null hypothesis H0: our weights are independent of the foreign ones and their distribution is
invariant under permutations of the residual stream and of each block's units (true of the usual
random inits, and kept by training, which is permutation-equivariant). Under H0 each ``csu`` matching
is a uniformly random permutation, independently across tests, so its one-sided Spearman p-value is
exact and Fisher's method applies. ``match`` tests that the two matchings are unrelated: exact when
the two matrices of a group are independent with exchangeable units (random init), for trained
weights the approximation Zhu et al. use. Each of the two combined p-values is Bonferroni-corrected
over the tests and the foreign files; "derived" below DERIVED_ALPHA.

Tensors are paired by shape, in natural name order within each shape, so names may differ by prefix
(``model.layers.0.mlp.up.weight`` ↔ ``blocks.0.up.weight``). The raw LayerNorm/RMSNorm cosine is shown
with its null baseline (a ones-initialised gain vector against the foreign one) and the centred
(Pearson) value, never used as evidence.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

DERIVED_ALPHA = 1e-6  # "derived" below this, after Bonferroni over tests and foreign files
INDEPENDENT_P = 0.01  # "independent" needs every test above this, enough power, and the trajectory
MAX_UNITS = 4096  # at most this many units of ours are matched per group (an evenly spaced subset)
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


def _block(name: str) -> str:
    """The numbered module a tensor belongs to: its name up to the last index part, an index just
    before the parameter name (a ``Sequential`` inside a block) not counted when another precedes it
    (``h.3.mlp.c_fc.weight``, ``blocks.3.mlp.0.weight`` → ``h.3``, ``blocks.3``;
    ``layers.3.experts.7.w1.weight`` → ``layers.3.experts.7``); "" outside numbered modules."""
    parts = name.split(".")
    indices = [i for i, part in enumerate(parts) if part.isdigit()]
    if len(indices) >= 2 and indices[-1] == len(parts) - 2:
        indices.pop()
    return ".".join(parts[:indices[-1] + 1]) if indices else ""


def _mode(counts: Counter[int]) -> int | None:
    """The most frequent value, the smallest among ties; None when there is none."""
    if not counts:
        return None
    top = max(counts.values())
    return min(value for value, count in counts.items() if count == top)


def _residual_width(tensors: dict[str, np.ndarray]) -> int | None:
    """The residual width d: the commonest length of the norm gains, else the commonest axis
    length among the matrices (the smaller on a tie: d is below the MLP width)."""
    norms = Counter(int(t.shape[0]) for name, t in tensors.items() if _is_norm(name, t))
    return _mode(norms) or _mode(Counter(size for t in tensors.values() if t.ndim == 2 for size in set(t.shape)))


def _unit_rows(shape: tuple[int, ...], d: int) -> bool | None:
    """True for a (units, d) matrix, False for a (d, units) one, None when no axis or both have width d."""
    rows, cols = shape
    return None if (rows == d) == (cols == d) else cols == d


def _oriented(t: np.ndarray, unit_rows: bool, columns: np.ndarray) -> np.ndarray:
    """A matrix as (units, residual coordinates), keeping the given residual coordinates in that order."""
    return (t if unit_rows else t.T)[:, columns]


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1, norms)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between every row of a and every row of b."""
    cosines: np.ndarray = _unit(a.astype(np.float32)) @ _unit(b.astype(np.float32)).T
    return cosines


def _subset(units: int, cap: int = MAX_UNITS) -> np.ndarray:
    """Indices of the units that are used: all of them, or ``cap`` evenly spaced ones."""
    return np.arange(units) if units <= cap else np.linspace(0, units - 1, cap).round().astype(np.int64)


def _assign(similarity: np.ndarray) -> np.ndarray:
    """π with row i matched to column π[i] (Hungarian, maximal total similarity; at most as many
    rows as columns)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(similarity, maximize=True)
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
    """The statistics for one pair of weight sets; ``residual_aligned`` tells whether the foreign
    residual stream was aligned to ours through ``residual_tensors`` (ours) before matching."""

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
    residual_aligned: bool = False
    residual_tensors: tuple[str, ...] = ()

    @property
    def layernorm_note(self) -> str:
        """Why the raw LayerNorm cosine is shown but never used as evidence."""
        return LN_SENTENCE

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"verdict": self.verdict, "p_value": self.p_value, "p_csu": self.p_csu, "p_match": self.p_match,
                "matrices": self.matrices, "mlp_pairs": self.mlp_pairs, "reason": self.reason,
                "residual_aligned": self.residual_aligned, "residual_tensors": list(self.residual_tensors),
                "layernorm_cosine": self.layernorm_cosine, "layernorm_cosine_null": self.layernorm_cosine_null,
                "layernorm_pearson": self.layernorm_pearson}


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


def _embedding_pairs(a: dict[str, np.ndarray], pairs: list[tuple[str, str]], d: int) -> list[tuple[str, str]]:
    """The paired tensors whose non-residual axis both models index in the same order (token and
    position embeddings, an untied output head): outside numbered blocks, one axis of width d, the
    other of at least MIN_UNITS."""
    out = []
    for x, y in pairs:
        unit_rows = _unit_rows(a[x].shape, d)
        if unit_rows is not None and _block(x) == "" and a[x].shape[0 if unit_rows else 1] >= MIN_UNITS:
            out.append((x, y))
    return out


def _align_residual(a: dict[str, np.ndarray], b: dict[str, np.ndarray], embeddings: list[tuple[str, str]],
                    d: int) -> tuple[np.ndarray, np.ndarray]:
    """(our residual coordinates compared, the foreign coordinate matched to each): the columns of
    the embedding-like tensors, centred over their shared rows (at most MAX_FOREIGN_UNITS evenly
    spaced ones), matched by their cosines summed over the tensors, each weighted by √rows (a z-score
    under independence)."""
    ours = _subset(d)
    similarity = np.zeros((len(ours), d), dtype=np.float32)
    for x, y in embeddings:
        unit_rows = bool(_unit_rows(a[x].shape, d))
        ea, eb = (t if unit_rows else t.T for t in (a[x], b[y]))
        rows = _subset(ea.shape[0], MAX_FOREIGN_UNITS)
        ea, eb = ea[rows], eb[rows]
        ea, eb = ea - ea.mean(axis=0), eb - eb.mean(axis=0)
        similarity += math.sqrt(len(rows)) * _cosines(ea[:, ours].T, eb.T)
    return ours, _assign(similarity)


def _unit_groups(a: dict[str, np.ndarray], pairs: list[tuple[str, str]], d: int
                 ) -> tuple[list[tuple[int, list[tuple[str, str, bool]]]], int]:
    """The matrices with exactly one axis of width d among ``pairs``, grouped by block and number of
    units (those sharing a unit index, e.g. an MLP's up and down projections), as (units, members),
    each member (ours, foreign, unit axis is the rows); and how many square d×d matrices were left out."""
    groups: dict[tuple[str, int], list[tuple[str, str, bool]]] = defaultdict(list)
    square = 0
    for x, y in pairs:
        shape = a[x].shape
        unit_rows = _unit_rows(shape, d)
        square += shape == (d, d)
        if unit_rows is not None and MIN_UNITS <= shape[0 if unit_rows else 1] <= MAX_FOREIGN_UNITS:
            groups[(_block(x), shape[0 if unit_rows else 1])].append((x, y, unit_rows))
    return [(key[1], groups[key]) for key in sorted(groups, key=lambda k: (_natural(k[0]), k[1]))], square


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray], *, n_foreign: int = 1,
            trajectory_agrees: bool | None = None, progress: Callable[[str, int, int], Any] | None = None) -> Lineage:
    """Align the residual stream, then run both tests on two weight sets; ``trajectory_agrees`` None
    means no ledger (then the best answer for unrelated weights is "not shown to be derived").
    ``progress(stage, done, total)`` hears about each matching (Hungarian matching is cubic in the
    units)."""
    pairs = pair_by_shape(a, b, 2)
    d = _residual_width(a) or 0  # 0: no matrices, so nothing to align or group
    embeddings = _embedding_pairs(a, pairs, d) if d <= MAX_FOREIGN_UNITS else []
    # the embeddings' rows are left out of the unit tests: π_res was fitted on them, so after alignment
    # their rows agree more than chance even for independent models
    groups, square = _unit_groups(a, [pair for pair in pairs if pair not in embeddings], d)
    both = [len({unit_rows for _, _, unit_rows in members}) == 2 for _, members in groups]
    total, done = (1 if embeddings else 0) + len(groups) + 2 * sum(both), 0

    def tick() -> None:
        nonlocal done
        if progress:
            progress("lineage", done, total)
        done += 1

    csu, match_p = [], []
    columns_a = columns_b = np.arange(d)
    if embeddings:
        tick()
        columns_a, columns_b = _align_residual(a, b, embeddings, d)
        csu.append(_spearman_p(columns_a, columns_b)[1])
    for (units, members), two_ways in zip(groups, both, strict=True):
        rows = _subset(units)
        similarity: dict[bool, np.ndarray] = {}  # summed over the (units, d) matrices, and over the (d, units) ones
        for x, y, unit_rows in members:
            cosines = _cosines(_oriented(a[x], unit_rows, columns_a)[rows], _oriented(b[y], unit_rows, columns_b))
            similarity[unit_rows] = similarity[unit_rows] + cosines if unit_rows in similarity else cosines
        if two_ways:
            tick()
            first = _assign(similarity[True])
            tick()
            second = _assign(similarity[False])
            match_p.append(_spearman_p(first, second)[1])
        tick()
        parts = list(similarity.values())
        csu.append(_spearman_p(rows, _assign(parts[0] if len(parts) == 1 else parts[0] + parts[1]))[1])
    if progress:
        progress("lineage", total, total)
    p_csu, p_match = fisher(csu), fisher(match_p)
    tests = (1 if csu else 0) + (1 if match_p else 0)
    p_min = min(p_csu, p_match)
    corrected = min(1.0, p_min * max(tests, 1) * max(n_foreign, 1))
    ln = layernorm_stats(a, b)
    compared = embeddings + [(x, y) for _, members in groups for x, y, _ in members]
    power = len(compared) >= MIN_MATRICES
    if not pairs:
        verdict, reason = "inconclusive", "no weight matrices of equal shape to compare"
    elif not csu:
        verdict, reason = "inconclusive", f"no matrix of equal shape has exactly one axis of the residual width {d}"
    elif corrected < DERIVED_ALPHA:
        verdict, reason = "derived", f"matching tests reject independence (corrected p = {corrected:.2e})"
    elif not power:
        verdict, reason = "inconclusive", f"only {len(compared)} comparable matrix(es): too little power"
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
    if embeddings:
        reason += f"; residual stream (d = {d}) aligned through {', '.join(x for x, _ in embeddings)}"
    elif pairs:
        reason += (f"; residual stream (d = {d}) not aligned: no tensor outside the numbered blocks with one axis of "
                   "that width (an embedding) in both, so a copy with a permuted residual stream would go unseen")
    if pairs and square:
        reason += f"; {square} square {d}×{d} matrices left out (which axis is the residual stream is ambiguous)"
    return Lineage(verdict, corrected, p_csu, p_match, len(compared), len(match_p), reason, *ln,
                   paired=dict(compared), residual_aligned=bool(embeddings),
                   residual_tensors=tuple(x for x, _ in embeddings))


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
    sketch_f = NumpySketch.of(policy)({name: foreign[mapping[name]] for name in order})
    start = view.init.sketch
    steps, distance, cosine = [-1], [float(np.linalg.norm(start - sketch_f))], [0.0]
    toward = sketch_f - start
    columns = view.steps.columns  # the sketches logged, by row (ascending steps)
    for row, sketch in columns.sketches.items():
        moved = sketch - start
        steps.append(int(columns.steps[row]))
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
