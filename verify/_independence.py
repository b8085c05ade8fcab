"""The ``independence`` check: one lineage verdict per ``--against`` file."""

from __future__ import annotations

from pathlib import Path

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


def check_independence(ctx: Context) -> CheckResult:
    """Matching tests, LayerNorm cosine with its null baseline, and the recorded trajectory, per
    foreign file; fail if any is derived, warn if any is inconclusive."""
    view, against, progress = ctx.view, list(ctx.against), ctx.progress
    path, source = our_weights(view, ctx.model)
    if path is None:
        return CheckResult("independence", Status.SKIP, "no weights of this run to compare (give --model)",
                           summary="no weights to compare")
    ours = load_numpy(path)
    results = []
    for foreign_path in against:
        foreign = load_numpy(foreign_path)
        traj = trajectory(view, ours, foreign) if view is not None and view.recorded else None
        lineage = compare(ours, foreign, n_foreign=len(against), progress=progress,
                          trajectory_agrees=None if traj is None else bool(traj["agrees"]))
        entry = {"file": str(foreign_path), **lineage.to_dict()}
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
    if any(v != "independent" for v in verdicts):
        return CheckResult("independence", Status.WARN, summary, data, summary="lineage inconclusive: " + summary)
    return CheckResult("independence", Status.PASS, summary, data)
