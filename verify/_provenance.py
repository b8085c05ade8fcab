"""``checkpoints`` and ``init``: stored states match their entries; the init is regenerated from
the recipe and the genesis seed, bit for bit, and depends on that seed."""

from __future__ import annotations

from typing import Any

from ledger import _state
from ledger.errors import FormatError
from ledger.verify._context import Context
from ledger.verify._result import CheckResult, Status


def check_checkpoints(ctx: Context) -> CheckResult:
    """Every stored checkpoint matches its entry; pruned ones are reported as pruned, missing ones
    as missing (a warning: they may be kept elsewhere, see --checkpoints)."""
    view = ctx.view
    assert view is not None
    if not view.checkpoints:
        return CheckResult("checkpoints", Status.SKIP, "the run recorded no checkpoints",
                           summary="no checkpoints recorded")
    matched, pruned, missing, bad = [], [], [], []
    for cp in view.checkpoints:
        if cp.pruned:
            pruned.append(cp.step)
            continue
        if not cp.directory.is_dir():
            missing.append(cp.step)
            continue
        try:
            found = _state.digests_of(cp.directory)
            meta_step = _state.read_meta(cp.directory).get("step")
        except FormatError as exc:
            bad.append((cp.step, str(exc)))
            continue
        if found.state_digest != cp.body.state_digest:
            expected = cp.body.tensor_digests
            tensors = sorted(n for n in set(expected) | set(found.model) if expected.get(n) != found.model.get(n))
            parts = [f"tensors {', '.join(tensors[:5])}"] if tensors else []
            if found.optimizer_digest != cp.body.optimizer_digest:
                parts.append("optimizer state")
            if found.meta_digest != cp.body.meta_digest:
                parts.append("state.cbor (step, hyperparameters, scheduler, RNG)")
            bad.append((cp.step, f"differs in {'; '.join(parts) or 'its state digest'}"))
        elif meta_step != cp.step:
            bad.append((cp.step, f"holds step {meta_step}, its entry says {cp.step}"))
        else:
            matched.append(cp.step)
    init = next((cp for cp in view.checkpoints if cp.step == -1), None)
    if init is not None and init.body.model_digest != view.init.model_digest:
        bad.append((-1, "the init checkpoint's weights are not the genesis init fingerprint"))
    data: dict[str, Any] = {"matched": matched, "pruned": pruned, "missing": missing,
                            "bad": [{"step": s, "reason": r} for s, r in bad]}
    summary = f"{len(matched)} matched, {len(pruned)} pruned, {len(missing)} missing"
    if bad:
        detail = "; ".join(f"checkpoint at step {s} {r}" for s, r in bad[:5])
        return CheckResult("checkpoints", Status.FAIL, f"{detail} ({summary})", data)
    if missing:
        return CheckResult("checkpoints", Status.WARN, f"{summary}: checkpoints at steps {missing[:8]} are not here "
                           "(pass --checkpoints DIR if they are kept elsewhere)", data,
                           summary=f"{len(missing)} checkpoint(s) missing")
    return CheckResult("checkpoints", Status.PASS, f"{summary}; every stored state matches its entry", data)


def _constant(tensor: Any) -> bool:
    """All elements equal (LayerNorm ones, zero biases); a single element counts as constant only
    when it is 0 or ±1, so a random scalar must still change with the seed."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return True
    if flat.numel() == 1:
        return float(flat[0]) in (0.0, 1.0, -1.0)
    return bool((flat == flat[0]).all())


def check_init(ctx: Context) -> CheckResult:
    """Rebuild the model with the recipe and the genesis seed; compare every tensor digest with the
    genesis init fingerprint, and check that every non-constant floating-point tensor changes with
    the seed (a recipe that loads stored weights would otherwise pass)."""
    from ledger.torch import canonical_state, environment, torch_digests

    view, recipe = ctx.view, ctx.recipe
    assert view is not None
    seed = int(view.genesis.seed or 0)
    recorded = dict(view.init.tensor_digests)
    tensors, _ = canonical_state(recipe.build_model(seed))
    rebuilt = torch_digests(tensors)
    other, _ = canonical_state(recipe.build_model(seed + 1))
    differ = sorted(n for n in set(recorded) | set(rebuilt) if recorded.get(n) != rebuilt.get(n))
    seed_blind = sorted(n for n, t in tensors.items() if t.is_floating_point() and not _constant(t)
                        and n in other and bool((other[n] == t).all()))
    data: dict[str, Any] = {"tensors": len(recorded), "differ": differ, "seed_independent": seed_blind,
                            "seed": seed}
    recorded_torch = view.genesis.environment.get("torch")
    environment_here = environment(str(view.genesis.environment.get("device", "cpu")))
    problems = []
    if differ:
        problems.append(f"{len(differ)} of {len(recorded)} tensors differ from the genesis init fingerprint: "
                        f"{', '.join(differ[:8])}{' …' if len(differ) > 8 else ''}")
    if seed_blind:
        problems.append(f"{len(seed_blind)} non-constant tensor(s) do not change with the seed "
                        f"({', '.join(seed_blind[:8])}): the recipe does not draw them from its seed")
    if differ and not seed_blind and recorded_torch != environment_here.get("torch"):
        return CheckResult("init", Status.WARN, f"{problems[0]}, but torch differs (recorded {recorded_torch}, here "
                           f"{environment_here.get('torch')}): regeneration is only promised on the recorded "
                           "version; this is not evidence of reuse", data, summary="torch version differs")
    note = ""
    recorded_source = (view.genesis.recipe or {}).get("source_sha256")
    if ctx.recipe_digest is not None and recorded_source is not None and recorded_source != ctx.recipe_digest:
        note = "; note: the recipe file differs from the one recorded in genesis"
    if problems:
        return CheckResult("init", Status.FAIL, "; ".join(problems) + note, data)
    return CheckResult("init", Status.PASS, f"all {len(recorded)} init tensors regenerated bit-exactly from the recipe "
                       f"and seed {seed}, and every non-constant one depends on the seed{note}", data)
