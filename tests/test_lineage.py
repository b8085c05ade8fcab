"""Lineage against foreign models: the matching tests, not LayerNorm cosine, decide."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXED_SEED
from safetensors.torch import load_model, save_file

import ledger
from ledger import Signer
from ledger.hooks import FingerprintOptions, Recorder, train
from ledger.torch import build_scheduler, deterministic, run_step
from ledger.verify import verify_ledger
from ledger.verify._lineage import compare, load_numpy

SIGNER = Signer.from_seed(FIXED_SEED)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def small_recipe():
    recipe, _ = ledger.load_recipe(f"{EXAMPLES / 'charlm.py'}:recipe")
    return type(recipe)(dim=32, layers=2, heads=4, context=32, batch_size=16)


def fine_tune(path: Path, start: Path, steps: int = 30) -> Path:
    """A run whose recorded init is another model's final weights (the recipe builds a random one)."""
    recipe = small_recipe()
    deterministic()
    model = recipe.build_model(5)
    load_model(model, str(start))
    opt = recipe.build_optimizer(model)
    sched = build_scheduler(recipe, opt)
    rec = Recorder(path, model=model, optimizer=opt, scheduler=sched, key=SIGNER, seed=5,
                   fingerprints=FingerprintOptions(sketch=1))
    for step in range(steps):
        metrics, batch = run_step(recipe, model, opt, sched, 5, step)
        rec.step(batch=batch, **metrics)
    rec.close(final_weights=path.parent / f"{path.name}.safetensors")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lineage")
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        train(small_recipe(), steps=30, path=root / name, key=SIGNER, seed=seed,
              final_weights=root / f"{name}.safetensors", fingerprints=FingerprintOptions(sketch=1),
              checkpoint_every=15)
        out[name] = root / name
    out["c"] = fine_tune(root / "c", root / "a.safetensors")
    weights = load_numpy(root / "a.safetensors")
    rng = np.random.default_rng(0)
    permuted = dict(weights)
    for block in range(2):  # shuffle each MLP's hidden units consistently: up rows + bias, down columns
        p = rng.permutation(weights[f"blocks.{block}.up.weight"].shape[0])
        permuted[f"blocks.{block}.up.weight"] = weights[f"blocks.{block}.up.weight"][p]
        permuted[f"blocks.{block}.up.bias"] = weights[f"blocks.{block}.up.bias"][p]
        permuted[f"blocks.{block}.down.weight"] = weights[f"blocks.{block}.down.weight"][:, p]
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in permuted.items()},
              str(root / "a-permuted.safetensors"))
    out["a-permuted"] = root / "a-permuted.safetensors"
    renamed = {f"model.{k}": torch.from_numpy(v) for k, v in load_numpy(root / "b.safetensors").items()}
    save_file(renamed, str(root / "b-renamed.safetensors"))
    out["b-renamed"] = root / "b-renamed.safetensors"
    save_file({"x": torch.zeros(3, 5)}, str(root / "unrelated-shapes.safetensors"))
    out["unrelated"] = root / "unrelated-shapes.safetensors"
    return out


def independence(ledger_path: Path, *against: Path) -> tuple[str, list[dict]]:
    report = verify_ledger(ledger_path, key=SIGNER.public, model=ledger_path.parent / f"{ledger_path.name}.safetensors",
                           against=against)
    check = report.check("independence")
    return check.status, list(check.data["against"])


def test_two_runs_from_different_seeds_are_independent_despite_high_layernorm_cosine(runs):
    status, [result] = independence(runs["a"], runs["b-renamed"])  # names differ by a prefix
    assert result["verdict"] == "independent" and status == "pass", result
    assert result["layernorm_cosine"] > 0.95  # the number of the public accusation, here meaningless
    assert abs(result["layernorm_cosine"] - result["layernorm_cosine_null"]) < 0.05
    trajectory = result["trajectory"]
    assert result["p_value"] > 0.01 and trajectory["min_ratio"] > 0.5
    exact = trajectory["checkpoints"]  # exact distances at the stored checkpoints (init, 14, 29)
    assert [c["step"] for c in exact] == [-1, 14, 29] and all(abs(c["cos_matrices"] or 0) < 0.5 for c in exact)
    assert abs(exact[-1]["distance"] / exact[0]["distance"] - 1) < 0.5
    print(f"a vs b: p_csu {result['p_csu']:.3g} p_match {result['p_match']:.3g} "
          f"LN cosine {result['layernorm_cosine']:.4f} (null {result['layernorm_cosine_null']:.4f}, "
          f"Pearson {result['layernorm_pearson']:.3f}); exact distance to b {exact[0]['distance']:.2f} → "
          f"{exact[-1]['distance']:.2f}, cos(W_t−W_0, F−W_0) {exact[-1]['cos_matrices']:.4f}")


def test_fine_tuned_from_another_model_is_derived(runs):
    status, [result] = independence(runs["c"], runs["a"].parent / "a.safetensors")
    assert status == "fail" and result["verdict"] == "derived" and result["p_value"] < 1e-6
    report = verify_ledger(runs["c"], key=SIGNER.public, recipe=small_recipe())
    assert report.check("init").status == "fail"  # its init is not the recipe's either
    print(f"c vs a: p {result['p_value']:.3g}, LN cosine {result['layernorm_cosine']:.4f}")


def test_permuted_copy_is_derived_though_its_raw_cosine_is_near_zero(runs):
    a, p = load_numpy(runs["a"].parent / "a.safetensors"), load_numpy(runs["a-permuted"])
    raw = float(np.dot(a["blocks.0.up.weight"].ravel(), p["blocks.0.up.weight"].ravel()) /
                (np.linalg.norm(a["blocks.0.up.weight"]) * np.linalg.norm(p["blocks.0.up.weight"])))
    assert abs(raw) < 0.2
    assert compare(a, p).verdict == "derived"
    # on the permuted matrices alone the constrained test is blind; the unconstrained one is not
    mlp = {k: v for k, v in a.items() if ".up." in k or ".down." in k}
    result = compare(mlp, {k: p[k] for k in mlp})
    assert result.verdict == "derived" and result.p_match < 1e-6 and result.p_csu > 1e-3
    print(f"permuted: raw cosine {raw:.3f}, p_csu {result.p_csu:.3g}, p_match {result.p_match:.3g}")


def test_no_matching_shapes_is_inconclusive(runs):
    status, [result] = independence(runs["a"], runs["unrelated"])
    assert status == "warn" and result["verdict"] == "inconclusive"
    assert "no weight matrices of equal shape" in result["reason"]


@pytest.mark.parametrize("pair, derived", [(("a.safetensors", "b.safetensors"), False),
                                           (("a.safetensors", "c.safetensors"), True),
                                           (("a.safetensors", "a-permuted.safetensors"), True)])
def test_ledger_compare_makes_the_same_call(runs, pair, derived):
    root = runs["a"].parent
    out = subprocess.run([sys.executable, "-m", "ledger", "compare", str(root / pair[0]), str(root / pair[1]),
                          "--json"], capture_output=True, text=True)
    result = json.loads(out.stdout)
    assert out.returncode == (1 if derived else 0), out.stderr
    assert result["verdict"] == ("derived" if derived else "not shown to be derived")
    assert "independent" != result["verdict"]  # without a ledger it never says independent
