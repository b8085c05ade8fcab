"""``init``: the init is regenerated from the recipe and the genesis seed, bit for bit, and is a
random draw of the recipe: it depends on the seed, and the recipe's draws at other seeds are unrelated
to it and to each other (or, for a declared fine-tuning run, the init is the declared base)."""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ledger.errors import ConfigurationError, FormatError
from ledger.verify._context import Context
from ledger.verify._disclosure import watch_files, weights_like
from ledger.verify._result import CheckResult, Status

SEED_FLIP = 1 << 31
RELATED_ALPHA = 1e-6  # two draws are "related" below this corrected p-value (lineage's DERIVED_ALPHA)
MAX_BLOCKS = 4  # lineage tests on at most this many numbered blocks (evenly spaced) of a deep model
KS_CAP = 1 << 18  # the distribution test reads at most this many values of a tensor (evenly spaced)
CORRELATION_CAP = 1 << 20  # the correlation test reads at most this many coordinates of a tensor (evenly spaced)
KS_MIN = 64  # … and none of a tensor with fewer


def draw_seeds(seed: int) -> tuple[int, int, int]:
    """The genesis seed and the two other seeds ``init`` draws the recipe's init at: seed + 1 (seed − 1
    at the top of torch's seed range) and the seed with bit 31 flipped."""
    return seed, seed + 1 if seed < 2**64 - 1 else seed - 1, seed ^ SEED_FLIP


def _constant(tensor: Any) -> bool:
    """All elements equal (LayerNorm ones, zero biases); a single element counts as constant only
    when it is 0 or ±1, so a random scalar must still change with the seed."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return True
    if flat.numel() == 1:
        return float(flat[0]) in (0.0, 1.0, -1.0)
    return bool((flat == flat[0]).all())


class _RecipeRaised(Exception):
    """The recipe raised (or returned no model) while building the model at ``seed``."""

    def __init__(self, seed: int, error: BaseException) -> None:
        message = " ".join(str(error).split())
        if len(message) > 200:
            message = message[:199] + "…"
        super().__init__(f"the recipe raised while building the model at seed {seed}: "
                         f"{type(error).__name__}: {message}")


def _draw(recipe: Any, seed: int, recipe_file: str | None,
          opened: dict[str, None]) -> tuple[dict[str, Any], list[str]]:
    """The recipe's init at ``seed`` as canonical torch tensors, and which of them are buffers of its
    model; the files the recipe opened meanwhile are added to ``opened`` (disclosure)."""
    from ledger.torch import buffer_names, canonical_state

    with watch_files(ignore=[recipe_file] if recipe_file else []) as watch:
        try:
            model = recipe.build_model(seed)
            if not hasattr(model, "state_dict"):
                raise TypeError(f"build_model returned a {type(model).__name__}, not a torch.nn.Module")
            tensors, _ = canonical_state(model)
            buffers = buffer_names(model, tensors)
        except (Exception, SystemExit) as exc:  # a recipe calling sys.exit() ends the check, not the verifier
            raise _RecipeRaised(seed, exc) from exc
    opened.update(dict.fromkeys(watch.files))
    return tensors, buffers


def _recipe_file(recipe: Any) -> str | None:
    try:
        return inspect.getsourcefile(type(recipe))
    except (TypeError, OSError):
        return None


def _numpy(tensor: Any) -> np.ndarray:
    array: np.ndarray = tensor.detach().float().cpu().numpy()
    return array


def correlation_p(ours: np.ndarray, draw: np.ndarray) -> tuple[float, float]:
    """(Pearson r, two-sided p-value bound) for "``draw`` is independent of ``ours``". With both
    centred, S = Σ xᵢyᵢ is a sum of yᵢ's signs weighted by |xᵢyᵢ|; a draw symmetric about its mean
    (every usual random init) makes those signs fair coins given the magnitudes, so Hoeffding gives
    P(|S| ≥ t) ≤ 2·exp(−t² / 2Σxᵢ²yᵢ²) whatever ``ours`` is (a foreign model, another draw). At most
    CORRELATION_CAP evenly spaced coordinates are read."""
    if ours.size != draw.size or ours.size < 2:
        return 0.0, 1.0
    x, y = _spaced(ours.reshape(-1), CORRELATION_CAP), _spaced(draw.reshape(-1), CORRELATION_CAP)
    x, y = x.astype(np.float64), y.astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    s, v = float(x @ y), float(np.square(x * y).sum())
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    if v <= 0 or norm <= 0:
        return 0.0, 1.0
    return s / norm, min(1.0, 2 * math.exp(-s * s / (2 * v)))


def _spaced(flat: np.ndarray, cap: int) -> np.ndarray:
    """At most ``cap`` evenly spaced values of a flat array (the same positions for equal sizes)."""
    return flat if flat.size <= cap else flat[np.linspace(0, flat.size - 1, cap).astype(np.int64)]


def _block_of(name: str) -> str | None:
    match = re.match(r"(.*?\.\d+)\.", name)
    return match.group(1) if match else None


def _capped(names: list[str]) -> list[str]:
    """The tensors the lineage tests compare: all of them, or of a model with more than MAX_BLOCKS
    numbered blocks only those outside the blocks and in MAX_BLOCKS evenly spaced blocks."""
    blocks = list(dict.fromkeys(b for b in map(_block_of, names) if b is not None))
    if len(blocks) <= MAX_BLOCKS:
        return names
    keep = {blocks[round(i * (len(blocks) - 1) / (MAX_BLOCKS - 1))] for i in range(MAX_BLOCKS)}
    return [n for n in names if _block_of(n) is None or _block_of(n) in keep]


def _relation(ours: dict[str, np.ndarray], draw: dict[str, np.ndarray], pairs: list[tuple[str, str]], tests: int,
              n_foreign: int, lineage: bool) -> dict[str, Any]:
    """Are ``draw`` (a draw of the recipe) and ``ours`` related? The correlation test on every pair
    (ours name, draw name), Bonferroni-corrected over ``tests``; and the permutation-robust lineage
    tests (:func:`ledger.verify._lineage.compare`, corrected over ``n_foreign`` comparisons) when
    ``lineage``."""
    from ledger.verify._lineage import compare

    p_tensor = {y: correlation_p(ours[x], draw[y]) for x, y in pairs}
    correlated = sorted((p * tests, y) for y, (_, p) in p_tensor.items() if p * tests < RELATED_ALPHA)
    p_correlation = min([min(1.0, p * tests) for _, p in p_tensor.values()], default=1.0)
    out: dict[str, Any] = {"p_correlation": p_correlation, "correlated": [y for _, y in correlated[:8]],
                           "lineage": None}
    p_value = p_correlation
    if lineage:
        names = _capped([y for _, y in pairs])
        back = {y: x for x, y in pairs}
        result = compare({back[y]: ours[back[y]] for y in names}, {y: draw[y] for y in names}, n_foreign=n_foreign)
        out["lineage"] = {"verdict": result.verdict, "p_value": result.p_value, "matrices": result.matrices}
        p_value = min(p_value, result.p_value)
    out["p_value"] = p_value
    out["related"] = p_value < RELATED_ALPHA
    return out


def _seed_specific(claimed: dict[str, np.ndarray], others: list[dict[str, np.ndarray]],
                   names: list[str]) -> tuple[float, list[str]]:
    """Is the genesis draw distributed like the draws at the other seeds? Two-sample
    Kolmogorov–Smirnov per tensor (of at most MAX_BLOCKS blocks; at most KS_CAP evenly spaced
    values), Bonferroni over the tensors: (smallest corrected p, tensors below RELATED_ALPHA). A
    recipe that returns other weights at the genesis seed only shows here, unless those weights were
    made to look drawn."""
    from scipy.stats import ks_2samp

    def sample(a: np.ndarray) -> np.ndarray:
        return _spaced(a.reshape(-1), KS_CAP)

    tested = [n for n in _capped(names) if claimed[n].size >= KS_MIN]
    p_of = {}
    for name in tested:
        pooled = np.concatenate([sample(o[name]) for o in others])
        p_of[name] = min(1.0, float(ks_2samp(sample(claimed[name]), pooled).pvalue) * len(tested))
    bad = sorted((p, n) for n, p in p_of.items() if p < RELATED_ALPHA)
    return min(p_of.values(), default=1.0), [n for _, n in bad]


def _claims(view: Any, tensors: Mapping[str, Any], buffers: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Genesis's word for each tensor against the recipe's model (``tensors`` and their ``buffers``):
    the parameters it calls buffers (exempt from the seed test, the update bounds and the sketches),
    the tensors whose shape or dtype it misstates (the bounds are built from those), and a phrase
    for each kind of problem."""
    from ledger.torch import safetensors_dtype

    relabelled = sorted(n for n, t in view.genesis.tensors().items() if t.get("kind") == "buffer" and n in tensors
                        and n not in set(buffers))
    misstated = sorted(n for n, layout in view.genesis.layouts().items()
                       if n in tensors and layout != (tuple(tensors[n].shape), safetensors_dtype(tensors[n])))
    problems = []
    if relabelled:
        problems.append(f"genesis calls {len(relabelled)} parameter(s) of the recipe's model buffers "
                        f"({_names(relabelled)}): buffers are exempt from the seed test, the update bounds and the "
                        "sketches")
    if misstated:
        problems.append(f"genesis states other shapes or dtypes than the recipe's model for {len(misstated)} "
                        f"tensor(s) ({_names(misstated)}): the update bounds are built from those")
    return relabelled, misstated, problems


def _kinds(architecture: Mapping[str, Any]) -> dict[str, str]:
    """Tensor name → "parameter" or "buffer", from the genesis architecture."""
    return {str(t.get("name")): str(t.get("kind")) for t in architecture.get("tensors", []) if isinstance(t, Mapping)}


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds[:-1])) + f" and {seeds[-1]}" if len(seeds) > 1 else str(seeds[0])


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (" …" if len(names) > limit else "")


def check_init(ctx: Context) -> CheckResult:
    """Where the run starts. A declared fine-tuning base: the init must equal it (:func:`_check_base`).
    Otherwise the init must be the recipe's random draw at the genesis seed:

    - regenerated bit-exactly (every tensor digest equals the genesis init fingerprint);
    - every trainable random tensor (a floating-point parameter that is not constant) changes with the
      seed; buffers and non-floating tensors are exempt and listed as deterministic;
    - the recipe's draws at the genesis seed and at two other seeds (:func:`draw_seeds`) are unrelated
      to each other: the correlation test and the permutation-robust lineage tests, pairwise. A
      recipe returning a fixed model plus seed noise, or permuted by the seed, fails here;
    - the genesis draw is distributed like the other draws (a warning otherwise: the recipe may
      special-case the genesis seed);
    - with ``--against``: each foreign file against the three draws. Related to two or more draws is
      laundering (fail); to the genesis draw alone, the run shares an identical init with the foreign
      model's lineage (warn: "related through an identical init");
    - disclosure, not proof: weights-like files the recipe opened while imported or run (warn).

    A recipe that raises while building the model makes ``init`` warn with its error in one line."""
    view = ctx.view
    assert view is not None
    if view.genesis.base is not None:
        return _check_base(ctx, view.genesis.base)
    return _check_recipe(ctx)


def _check_recipe(ctx: Context) -> CheckResult:
    from ledger.torch import environment, torch_digests

    view, recipe = ctx.view, ctx.recipe
    assert view is not None
    seed = int(view.genesis.seed or 0)
    seeds = draw_seeds(seed)
    recorded = dict(view.init.tensor_digests)
    data: dict[str, Any] = {"tensors": len(recorded), "differ": [], "seed_independent": [], "seed": seed,
                            "draw_seeds": list(seeds)}
    recipe_file = _recipe_file(recipe)
    opened: dict[str, None] = dict.fromkeys(ctx.recipe_files)
    drawn: list[tuple[dict[str, Any], list[str]]] = []
    try:
        for s in seeds:
            drawn.append(_draw(recipe, s, recipe_file, opened))
    except _RecipeRaised as exc:
        data.update(_disclosed(opened), raised=str(exc))
        return CheckResult("init", Status.WARN, str(exc), data, summary="the recipe raised")
    draws = [d for d, _ in drawn]
    tensors, *others = draws
    rebuilt = torch_digests(tensors, view.digest_scheme)
    differ = sorted(n for n in set(recorded) | set(rebuilt) if recorded.get(n) != rebuilt.get(n))
    kinds = _kinds(view.genesis.architecture)
    # genesis's "buffer" is the trainer's word, and buffers are exempt (from the seed test below, the
    # optimizer bounds and the sketches): the recipe's model says which tensors are parameters
    relabelled, reshaped, claim_problems = _claims(view, tensors, drawn[0][1])

    def same(name: str, other: dict[str, Any]) -> bool:
        t, o = tensors[name], other.get(name)
        return o is not None and o.shape == t.shape and o.dtype == t.dtype and bool((o == t).all())

    exempt = {n for n, t in tensors.items() if kinds.get(n) == "buffer" or not t.is_floating_point()}
    constant = {n for n, t in tensors.items() if t.is_floating_point() and _constant(t)}
    identical = {n for n in tensors if all(same(n, o) for o in others)}
    deterministic = sorted((identical & exempt) | constant)
    seed_blind = sorted(n for n in tensors if n not in exempt and n not in constant
                        and any(same(n, o) for o in others))
    random_names = [n for n, t in tensors.items() if t.is_floating_point() and n not in constant and n not in identical
                    and n not in seed_blind and all(n in o and o[n].shape == t.shape for o in others)]
    data.update(differ=differ, seed_independent=seed_blind, deterministic=deterministic, relabelled=relabelled,
                reshaped=reshaped)
    arrays = [{n: _numpy(d[n]) for n in random_names} for d in draws]
    lineage = importlib.util.find_spec("scipy") is not None
    problems: list[str] = []
    warnings: list[tuple[str, str]] = []  # (sentence, summary)
    notes: list[str] = []
    # the recipe's three draws, pairwise
    pairs = []
    for i, j in ((0, 1), (0, 2), (1, 2)):
        relation = _relation(arrays[i], arrays[j], [(n, n) for n in random_names], 3 * len(random_names), 3, lineage)
        pairs.append({"seeds": [seeds[i], seeds[j]], **relation})
    data["pairs"] = pairs
    related = [p for p in pairs if p["related"]]
    if related:
        worst = min(related, key=lambda p: p["p_value"])
        evidence = [f"lineage {worst['lineage']['verdict']}"] if worst["lineage"] and \
            worst["lineage"]["verdict"] == "derived" else []
        if worst["correlated"]:
            evidence.append(f"correlated tensors {_names(worst['correlated'], 4)}")
        problems.append(f"the recipe's draws at seeds {_seeds(worst['seeds'])} are "
                        f"related (p = {worst['p_value']:.2g}: {'; '.join(evidence)}"
                        f"{'; ' + str(len(related)) + ' of 3 pairs' if len(related) > 1 else ''}): independent "
                        "random inits are not, so build_model returns a fixed model changed by the seed (noise, a "
                        "permutation)")
    # is the genesis draw like the others?
    if lineage and random_names:
        p_ks, specific = _seed_specific(arrays[0], arrays[1:], random_names)
        data.update(p_distribution=p_ks, seed_specific=specific)
        if specific:
            warnings.append((f"the init at seed {seed} is not distributed like the recipe's draws at seeds "
                             f"{_seeds(list(seeds[1:]))} (Kolmogorov–Smirnov p = {p_ks:.2g} in {_names(specific, 4)}): "
                             "the recipe may build other weights at the genesis seed only", "seed-specific init"))
    if ctx.against:
        data["against"] = _against(ctx.against, seeds, arrays, random_names, lineage, problems, warnings, notes)
    if ctx.base is not None:
        try:
            found = view.file_digests(ctx.base)
        except (FormatError, ConfigurationError) as exc:
            found = {}
            problems.append(f"the --base file cannot be read: {exc}")
        equal = sorted(n for n, d in recorded.items() if found.get(n) == d)
        data["equal_to_base_file"] = equal
        if equal:
            problems.append(f"the init equals {Path(ctx.base).name} in {len(equal)} of {len(recorded)} tensor(s) "
                            f"({_names(equal, 4)}), but genesis declares no base: undeclared fine-tuning")
        elif found:
            notes.append(f"genesis declares no base; the init shares no tensor with {Path(ctx.base).name}")
    data.update(_disclosed(opened))
    if data["opened"]:
        warnings.append((f"the recipe opened weights-like files while building the model: "
                         f"{_names(data['opened'], 4)} (disclosure, not proof)",
                         "the recipe opened weights-like files"))
    if not lineage:
        warnings.append(("the permutation-robust tests of the recipe's draws need scipy, which is not installed: "
                         "pip install 'training-ledger[lineage]' (only the correlation test ran)",
                         "scipy not installed"))
    # the verdict
    recorded_torch = view.genesis.environment.get("torch")
    torch_here = environment(str(view.genesis.environment.get("device", "cpu"))).get("torch")
    note = ""
    recorded_source = (view.genesis.recipe or {}).get("source_sha256")
    if ctx.recipe_digest is not None and recorded_source is not None and recorded_source != ctx.recipe_digest:
        note = "; note: the recipe file differs from the one recorded in genesis"
    if notes:
        note += "; " + "; ".join(notes)
    if differ:
        problems.insert(0, f"{len(differ)} of {len(recorded)} tensors differ from the genesis init fingerprint: "
                           f"{_names(differ)}")
    problems[:0] = claim_problems
    if seed_blind:
        problems.insert(1 if differ else 0, f"{len(seed_blind)} non-constant parameter(s) do not change with the seed "
                                            f"({_names(seed_blind)}): the recipe does not draw them from its seed")
    if differ and len(problems) == 1 and recorded_torch != torch_here:
        return CheckResult("init", Status.WARN, f"{problems[0]}, but torch differs (recorded {recorded_torch}, here "
                           f"{torch_here}): regeneration is only promised on the recorded version; this is not "
                           f"evidence of reuse", data, summary="torch version differs")
    if problems:
        return CheckResult("init", Status.FAIL, "; ".join(problems + [w for w, _ in warnings]) + note, data)
    fixed = sorted(set(deterministic) - constant)
    exempted = f"; {len(fixed)} deterministic tensor(s) exempt (buffers or not floating: {_names(fixed, 4)}, " \
               f"{sum(tensors[n].numel() for n in fixed)} elements)" if fixed else ""
    p_min = min(p["p_value"] for p in pairs)
    sentence = (f"all {len(recorded)} init tensors regenerated bit-exactly from the recipe and seed {seed}, and every "
                f"non-constant parameter depends on the seed; the recipe's draws at seeds {_seeds(list(seeds))} are "
                f"unrelated (smallest p = {p_min:.2g}){exempted}{note}")
    if warnings:
        return CheckResult("init", Status.WARN, "; ".join(w for w, _ in warnings) + f" ({sentence})", data,
                           summary="; ".join(s for _, s in warnings))
    return CheckResult("init", Status.PASS, sentence, data)


def _against(files: tuple[Path, ...], seeds: tuple[int, int, int], arrays: list[dict[str, np.ndarray]],
             names: list[str], lineage: bool, problems: list[str], warnings: list[tuple[str, str]],
             notes: list[str]) -> list[dict[str, Any]]:
    """Each foreign file against the recipe's three draws (``arrays``, at ``seeds``; the genesis seed
    first): related to two or more draws is laundering (a problem), to the genesis draw alone an
    identical init (a warning), to another draw alone a fact about the foreign model (a note).
    Tensors are paired by name, else by shape in natural order."""
    from ledger.verify._lineage import load_numpy, pair_by_shape

    seed, results = seeds[0], []
    for path in files:
        foreign = load_numpy(path)
        mapped = {n: n for n in names if n in foreign and foreign[n].shape == arrays[0][n].shape}  # ours → foreign
        if len(mapped) < len(names):
            mine = {n: arrays[0][n] for n in names if n not in mapped}
            theirs = {n: a for n, a in foreign.items() if n not in mapped.values() and a.dtype.kind == "f"}
            for ndim in sorted({a.ndim for a in mine.values()}):
                mapped.update(pair_by_shape(mine, theirs, ndim))
        pairs = [(theirs_name, ours_name) for ours_name, theirs_name in mapped.items()]
        tests = 3 * len(files) * max(len(pairs), 1)
        per_draw = [{"seed": s, **_relation(foreign, d, pairs, tests, 3 * len(files), lineage)}
                    for s, d in zip(seeds, arrays, strict=True)]
        related = [r["seed"] for r in per_draw if r["related"]]
        outcome = "laundering" if len(related) >= 2 else "identical init" if related == [seed] else \
            "shares another seed's init" if related else "unrelated"
        if outcome == "identical init" and _distance(foreign, arrays[0], pairs) < SAME_WEIGHTS:
            outcome = "is the foreign model"  # the recipe special-cases the genesis seed
        results.append({"file": str(path), "outcome": outcome, "related_seeds": related, "draws": per_draw})
        name, p = Path(path).name, min(r["p_value"] for r in per_draw)
        if outcome == "is the foreign model":
            problems.append(f"the init is {name} itself (relative distance below {SAME_WEIGHTS:g}): the recipe returns "
                            f"that model at the genesis seed {seed} and draws at the others — not an identical init, "
                            "which a model trained from it would have moved away from")
        elif outcome == "laundering":
            problems.append(f"{name} is related to the recipe's draws at seeds {_seeds(related)} (p = {p:.2g}): "
                            "the recipe builds its init from that model (laundering)")
        elif outcome == "identical init":
            warnings.append((f"{name} is related to this run's init but not to the recipe's draws at seeds "
                             f"{_seeds(list(seeds[1:]))} (p = {p:.2g}): related through an identical init — the "
                             f"foreign model's lineage started from the recipe at seed {seed}, as with the same "
                             "architecture and seed, not a copy (or the recipe special-cases that seed)",
                             f"related through an identical init ({name})"))
        elif outcome == "shares another seed's init":
            notes.append(f"{name} shares the recipe's init at seed {related[0]}, not this run's")
    return results


SAME_WEIGHTS = 1e-3  # relative distance under which a draw is the foreign weights themselves, not a shared init


def _distance(foreign: dict[str, np.ndarray], draw: dict[str, np.ndarray], pairs: list[tuple[str, str]]) -> float:
    """‖F − W‖ / ‖W‖ over the paired tensors (a model trained from the same init is far from 0)."""
    diff = sum(float(np.square(foreign[f].astype(np.float64) - draw[o].astype(np.float64)).sum()) for f, o in pairs)
    size = sum(float(np.square(draw[o].astype(np.float64)).sum()) for _, o in pairs)
    return math.sqrt(diff / size) if size else math.inf


def _disclosed(opened: dict[str, None]) -> dict[str, Any]:
    files = list(opened)
    return {"opened": [f for f in files if weights_like(f)], "files": files[:50]}


def _check_base(ctx: Context, base: dict[str, Any]) -> CheckResult:
    """A run that declares fine-tuning from a named base: the init fingerprint equals the declared
    base's digests and, with ``--base FILE``, the file's; tensors of the init that the file lacks (a
    new head) are regenerated from the recipe when one is given. The seed-dependence and laundering
    tests do not apply: the base is not a random draw."""
    view = ctx.view
    assert view is not None
    label = f"{base['id']} (revision {base['revision']})" if base.get("revision") else str(base["id"])
    declared: dict[str, bytes] = dict(base["tensor_digests"])
    recorded = dict(view.init.tensor_digests)
    seed = int(view.genesis.seed or 0)
    data: dict[str, Any] = {"tensors": len(recorded), "differ": [], "seed_independent": [], "seed": seed,
                            "base": {"id": base["id"], "revision": base.get("revision"),
                                     "file": str(ctx.base) if ctx.base is not None else None}}
    unlike = sorted(n for n in set(declared) | set(recorded) if declared.get(n) != recorded.get(n))
    if unlike:
        data["differ"] = unlike
        return CheckResult("init", Status.FAIL, f"genesis declares fine-tuning from {label}, but the declared base "
                           f"differs from the init fingerprint in {len(unlike)} tensor(s): {_names(unlike)}", data)
    not_applied = "the seed-dependence and laundering tests do not apply to a declared base"
    drawn: dict[str, Any] | None = None  # the recipe's model at the seed, when a recipe is given
    if ctx.recipe is not None and importlib.util.find_spec("torch") is not None:
        opened: dict[str, None] = dict.fromkeys(ctx.recipe_files)
        try:
            drawn, buffers = _draw(ctx.recipe, seed, _recipe_file(ctx.recipe), opened)
        except _RecipeRaised as exc:
            data["raised"] = str(exc)
            return CheckResult("init", Status.WARN, f"fine-tuned from {label}: {exc}", data,
                               summary="the recipe raised")
        data["relabelled"], data["reshaped"], problems = _claims(view, drawn, buffers)
        if problems:
            return CheckResult("init", Status.FAIL, "; ".join(problems), data)
    if ctx.base is None:
        return CheckResult("init", Status.WARN, f"declares fine-tuning from {label}: give --base FILE to check it "
                           f"({not_applied})", data, summary=f"fine-tuning from {label} not checked (no --base)")
    try:
        found = view.file_digests(ctx.base)
    except (FormatError, ConfigurationError) as exc:
        return CheckResult("init", Status.FAIL, f"the --base file cannot be read: {exc}", data)
    differ = sorted(n for n in declared if n in found and found[n] != declared[n])
    kinds = _kinds(view.genesis.architecture)
    absent = sorted(n for n in declared if n not in found)
    new = [n for n in absent if kinds.get(n) != "buffer"]
    data.update(differ=differ, not_in_base=absent, unused_in_base=sorted(set(found) - set(declared))[:50])
    if differ:
        return CheckResult("init", Status.FAIL, f"genesis declares fine-tuning from {label}, but {Path(ctx.base).name} "
                           f"differs from the init in {len(differ)} of {len(declared)} tensor(s): {_names(differ)}",
                           data)
    sentence = f"fine-tuned from {label}: {len(declared) - len(absent)} init tensors equal {Path(ctx.base).name}"
    if absent and len(new) < len(absent):
        sentence += f"; {len(absent) - len(new)} buffer(s) not in it"
    if new:
        if drawn is None:
            return CheckResult("init", Status.WARN, f"{sentence}; {len(new)} parameter(s) are not in the base file and "
                               f"were not regenerated (give --recipe): {_names(new)} ({not_applied})", data,
                               summary="init tensors outside the base not regenerated")
        from ledger.torch import torch_digests

        rebuilt = torch_digests({n: drawn[n] for n in new if n in drawn}, view.digest_scheme)
        wrong = sorted(n for n in new if rebuilt.get(n) != declared[n])
        data["regenerated"] = sorted(set(new) - set(wrong))
        if wrong:
            data["differ"] = wrong
            return CheckResult("init", Status.FAIL, f"{sentence}, but {len(wrong)} tensor(s) outside the base differ "
                               f"from the recipe's draw at seed {seed}: {_names(wrong)}", data)
        sentence += f"; {len(new)} tensor(s) outside the base regenerated from the recipe at seed {seed}"
    return CheckResult("init", Status.PASS, f"{sentence} ({not_applied})", data)
