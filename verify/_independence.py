"""The ``independence`` check: one lineage verdict per ``--against`` file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ledger.verify._context import Context
from ledger.verify._lineage import LN_SENTENCE, compare, load_numpy, trajectory
from ledger.verify._result import CheckResult, Status
from ledger.verify._run import RunView


def our_weights(view: RunView | None, model: Path | None) -> tuple[Path | None, str]:
    """The weights to test: --model, else the last stored checkpoint's weights."""
    if model is not None:
        return model, "--model"
    if view is not None:
        stored = [cp for cp in view.stored_checkpoints() if (cp.directory / "model.safetensors").is_file()]
        if stored:
            return stored[-1].directory / "model.safetensors", f"the checkpoint at step {stored[-1].step}"
    return None, ""


IDENTICAL_INIT = "related through an identical init"
FROM_BASE = "derived from the declared base"


def _declared_base(view: RunView | None, path: Path, entry: dict[str, Any]) -> bool:
    """A "derived" pair whose foreign file is the base the run declares it fine-tunes (its tensors
    have the digests genesis declares): expected ancestry, reported, not failed."""
    base = view.genesis.base if view is not None and view.recorded else None
    if view is None or base is None:
        return False
    declared, found = base["tensor_digests"], view.file_digests(path)
    shared = set(declared) & set(found)
    if not shared or any(declared[n] != found[n] for n in shared):
        return False
    entry["verdict"] = f"{FROM_BASE} ({base['id']})"
    entry["reason"] = (f"the file holds the weights genesis declares as the base this run fine-tunes ({base['id']}, "
                       f"{len(shared)} tensors by digest): derivation from it is declared, not hidden")
    return True


def _shared_init(ctx: Context, entry: dict[str, Any], trajectory: dict[str, Any] | None) -> None:
    """A "derived" pair whose relation is the init: the ``init`` check found the foreign model related
    to this run's genesis draw only (the same architecture and seed, not a copy), and the recorded
    trajectory never came within half its starting distance of it. Without that evidence the verdict
    stands, with a hint."""
    init = ctx.results.get("init")
    outcomes = {a.get("file"): a.get("outcome") for a in (init.data.get("against", []) if init else [])
                if isinstance(a, dict)}
    # two runs from one init on similar data move in similar directions (the cosine test of "independent"
    # does not apply); what copying would show is a walk onto the foreign weights
    never_close = trajectory is None or float(trajectory.get("min_ratio", 0.0)) >= 0.5
    if outcomes.get(entry["file"]) == "identical init" and never_close:
        entry["verdict"] = IDENTICAL_INIT
        entry["reason"] = ("the foreign model is related to this run's init, which is the recipe's draw at the "
                           "genesis seed and unrelated to its draws at other seeds (init), and the trajectory never "
                           "comes close to it: both grew from an identical init, which is not copying")
    elif outcomes.get(entry["file"]) is None:
        entry["reason"] += ("; if both runs drew an identical init (same architecture and seed), give --recipe: "
                            "init can then show it")


def _buffers(view: RunView | None) -> set[str]:
    """The recorded model's buffers (left out of the matching tests; the foreign file's tensors of the
    same names too)."""
    if view is None or not view.recorded:
        return set()
    return {name for name, t in view.genesis.tensors().items() if t.get("kind") == "buffer"}


def check_independence(ctx: Context) -> CheckResult:
    """Matching tests, LayerNorm cosine with its null baseline, and the recorded trajectory, per
    foreign file; fail if any is derived, warn if any is inconclusive."""
    view, against, progress = ctx.view, list(ctx.against), ctx.progress
    path, source = our_weights(view, ctx.model)
    if path is None:
        return CheckResult("independence", Status.SKIP, "no weights of this run to compare (give --model)",
                           summary="no weights to compare")
    ours = load_numpy(path)
    buffers = _buffers(view)  # deterministic tables (masks, sinusoidal positions) relate any two models
    ours = {name: array for name, array in ours.items() if name not in buffers}
    results = []
    for foreign_path in against:
        foreign = {name: array for name, array in load_numpy(foreign_path).items() if name not in buffers}
        traj = trajectory(view, ours, foreign) if view is not None and view.recorded else None
        lineage = compare(ours, foreign, n_foreign=len(against), progress=progress,
                          trajectory_agrees=None if traj is None else bool(traj["agrees"]))
        entry = {"file": str(foreign_path), **lineage.to_dict()}
        if lineage.verdict == "derived" and not _declared_base(view, foreign_path, entry):
            _shared_init(ctx, entry, traj)
        if traj is not None:
            entry["trajectory"] = traj
        elif view is not None:
            entry["trajectory"] = None
            entry["reason"] += "; no trajectory: the foreign file does not cover every fingerprinted tensor"
        results.append(entry)
    data = {"against": results, "weights": str(path), "weights_from": source, "layernorm_note": LN_SENTENCE}
    verdicts = [r["verdict"] for r in results]
    summary = "; ".join(f"{Path(r['file']).name}: {r['verdict']} (p = {r['p_value']:.2g})" for r in results)
    if "derived" in verdicts:
        return CheckResult("independence", Status.FAIL, summary, data)
    if IDENTICAL_INIT in verdicts or any(v.startswith(FROM_BASE) for v in verdicts):
        return CheckResult("independence", Status.WARN, summary, data, summary=summary)
    if any(v != "independent" for v in verdicts):
        return CheckResult("independence", Status.WARN, summary, data, summary="lineage inconclusive: " + summary)
    return CheckResult("independence", Status.PASS, summary, data)
