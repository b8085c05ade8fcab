"""``init`` is sound against recipes that launder a foreign model (issue 9, items 2 and 8, and the
honest cases): the recipe's draws at three seeds must be unrelated, a foreign file related to more
than one draw is laundering, deterministic buffers are exempt, a declared base is checked against
``--base``, weights-like files the recipe opens are disclosed, and a recipe that raises makes ``init``
warn. Tiny CPU models (tests/recipes.py's MLP and examples/charlm.py at 32 wide), real ledgers."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FIXED_SEED
from recipes import TinyRecipe
from safetensors.torch import load_file, save_file, save_model
from torch import nn

import ledger
from ledger import ConfigurationError, Signer
from ledger.hooks import Recorder
from ledger.torch import build_scheduler, canonical_state, deterministic, run_step
from ledger.verify import verify_ledger

SIGNER = Signer.from_seed(FIXED_SEED)
SEED = 3
TESTS = Path(__file__).resolve().parent
EXAMPLES = TESTS.parent / "examples"


def record(path: Path, recipe: Any, *, steps: int = 3, model: Any = None, base: dict[str, str] | None = None) -> Path:
    """A short recorded run of ``recipe`` at SEED (no checkpoints: ``init`` is what is tested)."""
    deterministic()
    model = recipe.build_model(SEED) if model is None else model
    optimizer = recipe.build_optimizer(model)
    scheduler = build_scheduler(recipe, optimizer)
    rec = Recorder(path, model=model, optimizer=optimizer, scheduler=scheduler, key=SIGNER, seed=SEED, recipe=recipe,
                   base=base, determinism={"rng": "reseed-per-step/v1"})
    for step in range(steps):
        metrics, batch = run_step(recipe, model, optimizer, scheduler, SEED, step)
        rec.step(batch=batch, **metrics)
    rec.close(final_weights=path.parent / f"{path.name}.safetensors")
    return path


def init_of(path: Path, recipe: Any, **kwargs: Any) -> Any:
    report = verify_ledger(path, key=SIGNER.public, recipe=recipe, replay=0, replay_seed=1, **kwargs)
    return report.check("init")


def pairs(init: Any) -> str:
    return ", ".join(f"{a}~{b}: p={p['p_value']:.2g}" for p in init.data["pairs"] for a, b in [p["seeds"]])


SMALL = {"dim": 32, "layers": 2, "heads": 4, "context": 32, "batch_size": 16}


def small_charlm() -> Any:
    recipe, _ = ledger.load_recipe(f"{EXAMPLES / 'charlm.py'}:recipe")
    return type(recipe)(**SMALL)


CharRecipe = type(small_charlm())


def trained(recipe: Any, seed: int, steps: int) -> nn.Module:
    deterministic()
    model = recipe.build_model(seed)
    optimizer = recipe.build_optimizer(model)
    for step in range(steps):
        run_step(recipe, model, optimizer, None, seed, step)
    return model


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, Any]:
    """F: a small character model trained 10 steps from seed 99 (its state and its safetensors file);
    and the same for the MLP."""
    root = tmp_path_factory.mktemp("foreign")
    model = trained(small_charlm(), 99, 10)
    save_model(model, str(root / "F.safetensors"))
    mlp = trained(TinyRecipe(), 99, 30)
    return {"charlm": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "file": root / "F.safetensors", "mlp": {k: v.detach().clone() for k, v in mlp.state_dict().items()}}


# ----------------------------------------------------------------------------- 1. laundering through the recipe
class NoisyMLP(TinyRecipe):
    """Launders F: build_model returns the foreign MLP plus 0.01·noise drawn from the seed."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.state = state

    def build_model(self, seed: int) -> nn.Module:
        return plus_noise(super().build_model(seed), self.state, seed)


class NoisyChar(CharRecipe):  # type: ignore[misc, valid-type]
    """Launders F: the foreign character model plus 0.01·noise drawn from the seed."""

    state: dict[str, torch.Tensor] = {}

    def build_model(self, seed: int) -> nn.Module:
        return plus_noise(super().build_model(seed), self.state, seed)


def plus_noise(model: nn.Module, state: dict[str, torch.Tensor], seed: int) -> nn.Module:
    """``model`` holding ``state`` plus 0.01·noise drawn from ``seed``."""
    model.load_state_dict(state)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    return model


def permuted(state: dict[str, torch.Tensor], seed: int, layers: int = 2, heads: int = 4) -> dict[str, torch.Tensor]:
    """The character model with its residual stream, its attention heads and every MLP's hidden units
    re-indexed by permutations drawn from ``seed``: the same function, every tensor moved."""
    g = torch.Generator().manual_seed(seed)
    d = state["pos.weight"].shape[1]
    r = torch.randperm(d, generator=g)
    width = d // heads
    out = dict(state)
    for name in ("tok.weight", "head.weight", "pos.weight"):
        out[name] = state[name][:, r]
    for name, t in state.items():
        if name.startswith("ln.") or ".ln1." in name or ".ln2." in name:
            out[name] = t[r]
    for b in range(layers):
        p = f"blocks.{b}."
        h = torch.randperm(state[p + "up.weight"].shape[0], generator=g)
        order = torch.randperm(heads, generator=g)  # attention heads: q, k, v rows and proj columns alike
        channels = (order[:, None] * width + torch.arange(width)).reshape(-1)
        rows = torch.cat([part * d + channels for part in range(3)])
        out[p + "qkv.weight"], out[p + "qkv.bias"] = state[p + "qkv.weight"][rows][:, r], state[p + "qkv.bias"][rows]
        out[p + "proj.weight"] = state[p + "proj.weight"][r][:, channels]
        out[p + "proj.bias"] = state[p + "proj.bias"][r]
        out[p + "up.weight"], out[p + "up.bias"] = state[p + "up.weight"][h][:, r], state[p + "up.bias"][h]
        out[p + "down.weight"], out[p + "down.bias"] = state[p + "down.weight"][r][:, h], state[p + "down.bias"][r]
    return out


class PermutedChar(CharRecipe):  # type: ignore[misc, valid-type]
    """Launders F: the foreign character model, permuted by the seed (function-preserving)."""

    state: dict[str, torch.Tensor] = {}

    def build_model(self, seed: int) -> nn.Module:
        model = super().build_model(seed)
        model.load_state_dict(permuted(self.state, seed))
        return model


def test_honest_recipes_draw_unrelated_inits(tmp_path):
    for name, recipe in (("mlp", TinyRecipe()), ("charlm", small_charlm())):
        init = init_of(record(tmp_path / name, recipe), recipe)
        assert init.status == "pass", init.detail
        assert init.data["draw_seeds"] == [SEED, SEED + 1, SEED ^ (1 << 31)]
        assert not any(p["related"] for p in init.data["pairs"]) and init.data["opened"] == []
        assert "unrelated" in init.detail and init.data["seed_specific"] == []
        print(f"honest {name}: {pairs(init)}; KS p = {init.data['p_distribution']:.2g}")


def test_foreign_mlp_plus_seed_noise_fails(tmp_path, foreign):
    recipe = NoisyMLP(foreign["mlp"])
    init = init_of(record(tmp_path / "L", recipe), recipe)
    assert init.status == "fail" and init.data["differ"] == []
    assert f"draws at seeds {SEED} and {SEED + 1} are related" in init.detail and "p = " in init.detail
    assert all(p["related"] for p in init.data["pairs"]) and "0.weight" in init.data["pairs"][0]["correlated"]
    print(f"F + noise (MLP): {pairs(init)}")


def test_foreign_charlm_plus_seed_noise_fails(tmp_path, foreign):
    recipe = NoisyChar(**SMALL)
    NoisyChar.state = foreign["charlm"]
    init = init_of(record(tmp_path / "L", recipe), recipe)
    assert init.status == "fail" and "are related" in init.detail
    assert all(p["lineage"]["verdict"] == "derived" for p in init.data["pairs"])
    print(f"F + noise (charlm): {pairs(init)}")


def test_seed_permuted_foreign_fails_through_the_lineage_tests(tmp_path, foreign):
    state = foreign["charlm"]
    model = small_charlm().build_model(0)
    model.load_state_dict(state)
    x = torch.randint(0, 50, (2, 16))
    expected = model(x)
    model.load_state_dict(permuted(state, SEED))
    torch.testing.assert_close(model(x), expected, atol=2e-5, rtol=1e-5)  # the same function
    recipe = PermutedChar(**SMALL)
    PermutedChar.state = state
    init = init_of(record(tmp_path / "L", recipe), recipe)
    assert init.status == "fail" and "lineage derived" in init.detail and init.data["seed_independent"] == []
    assert all(p["lineage"]["verdict"] == "derived" and p["correlated"] == [] for p in init.data["pairs"])
    print(f"F permuted by the seed: {pairs(init)}; correlation p {[p['p_correlation'] for p in init.data['pairs']]}")


class SpecialCase(CharRecipe):  # type: ignore[misc, valid-type]
    """Launders F at the genesis seed only, honest at every other seed."""

    state: dict[str, torch.Tensor] = {}

    def build_model(self, seed: int) -> nn.Module:
        model = super().build_model(seed)
        if seed == SEED:
            model.load_state_dict(self.state)
        return model


def test_a_recipe_that_special_cases_the_genesis_seed_warns(tmp_path, foreign):
    recipe = SpecialCase(**SMALL)
    SpecialCase.state = foreign["charlm"]
    path = record(tmp_path / "L", recipe)
    init = init_of(path, recipe)  # without --against: the distribution test is the only witness
    assert init.status == "warn" and not any(p["related"] for p in init.data["pairs"][2:])
    assert "not distributed like the recipe's draws" in init.detail and init.data["seed_specific"]
    against = init_of(path, recipe, against=[foreign["file"]])  # with it: the init is F itself
    assert against.status == "fail" and against.data["against"][0]["outcome"] == "is the foreign model"
    print(f"special-cased genesis seed: KS p = {init.data['p_distribution']:.2g} in {init.data['seed_specific'][:3]}")


# ----------------------------------------------------------------------------- 2. --against
def test_against_a_laundered_model_fails(tmp_path, foreign):
    recipe = NoisyChar(**SMALL)
    NoisyChar.state = foreign["charlm"]
    init = init_of(record(tmp_path / "L", recipe), recipe, against=[foreign["file"]])
    against = init.data["against"][0]
    assert init.status == "fail" and against["outcome"] == "laundering" and len(against["related_seeds"]) == 3
    assert "laundering" in init.detail
    renamed = {f"model.{k}": v for k, v in load_file(str(foreign["file"])).items()}  # names differ: paired by shape
    save_file(renamed, str(tmp_path / "F-renamed.safetensors"))
    again = init_of(tmp_path / "L", recipe, against=[tmp_path / "F-renamed.safetensors"])
    assert again.status == "fail" and again.data["against"][0]["outcome"] == "laundering"
    print(f"--against F, laundered: {[(d['seed'], d['p_value']) for d in against['draws']]}")


def test_against_a_model_with_the_same_init_warns(tmp_path):
    class OtherData(CharRecipe):  # type: ignore[misc, valid-type]
        def batch(self, step: int) -> Any:
            return super().batch(step + 10_000)

    lab_b = trained(OtherData(**SMALL), SEED, 20)
    save_model(lab_b, str(tmp_path / "B.safetensors"))
    recipe = small_charlm()
    init = init_of(record(tmp_path / "L", recipe), recipe, against=[tmp_path / "B.safetensors"])
    against = init.data["against"][0]
    assert init.status == "warn" and against["outcome"] == "identical init" and against["related_seeds"] == [SEED]
    assert "related through an identical init" in init.detail and "not a copy" in init.detail
    print(f"--against a model trained from the same init: {[(d['seed'], d['p_value']) for d in against['draws']]}")
    # the lineage of the final weights: related (p ~ 0), but through the identical init, not copied
    report = verify_ledger(tmp_path / "L", key=SIGNER.public, recipe=recipe, replay=0, replay_seed=1,
                           model=tmp_path / "L.safetensors", against=[tmp_path / "B.safetensors"])
    independence = report.check("independence")
    assert independence.status == "warn" and report.verdict == "pass", independence.detail
    assert independence.data["against"][0]["verdict"] == "related through an identical init"
    without_recipe = verify_ledger(tmp_path / "L", key=SIGNER.public, model=tmp_path / "L.safetensors",
                                   against=[tmp_path / "B.safetensors"]).check("independence")
    assert without_recipe.status == "fail" and "give --recipe" in without_recipe.data["against"][0]["reason"]


# ----------------------------------------------------------------------------- 3. deterministic tensors
class Buffered(nn.Module):
    """The MLP with a sinusoidal position table and a causal mask as persistent buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 1))
        position = torch.arange(16, dtype=torch.float32).unsqueeze(1)
        frequency = torch.exp(-math.log(1e4) * torch.arange(0, 8, 2, dtype=torch.float32) / 8)
        table = torch.zeros(16, 8)
        table[:, 0::2], table[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)
        self.register_buffer("pe", table)
        self.register_buffer("mask", torch.tril(torch.ones(16, 16)))  # causal mask, as nanoGPT keeps it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.pe[: x.shape[0]])


class BufferedRecipe(TinyRecipe):
    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return Buffered()


class FixedArray(TinyRecipe):
    def build_model(self, seed: int) -> nn.Module:
        model = super().build_model(seed)
        with torch.no_grad():
            fixed = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
            model[0].weight.copy_(torch.from_numpy(fixed))
        return model


def test_deterministic_buffers_are_exempt_but_a_fixed_parameter_fails(tmp_path):
    recipe = BufferedRecipe()
    init = init_of(record(tmp_path / "buffers", recipe), recipe)
    assert init.status == "pass", init.detail
    assert {"pe", "mask"} <= set(init.data["deterministic"]) and init.data["seed_independent"] == []
    assert "deterministic tensor(s) exempt" in init.detail and "mask, pe" in init.detail
    fixed = FixedArray()
    init = init_of(record(tmp_path / "fixed", fixed), fixed)
    assert init.status == "fail" and init.data["seed_independent"] == ["0.weight"]
    assert "do not change with the seed (0.weight)" in init.detail


# ----------------------------------------------------------------------------- 4. declared fine-tuning
@pytest.fixture(scope="module")
def based(tmp_path_factory) -> dict[str, Path]:
    """A run that fine-tunes acme/tiny (revision r1), loaded from a file, and another model's file."""
    root = tmp_path_factory.mktemp("base")
    for name, seed in (("base", 77), ("other", 78)):
        save_file({k: v.contiguous() for k, v in trained(TinyRecipe(), seed, 5).state_dict().items()},
                  str(root / f"{name}.safetensors"))
    recipe = TinyRecipe()
    model = recipe.build_model(SEED)
    model.load_state_dict(load_file(str(root / "base.safetensors")))
    path = record(root / "L", recipe, model=model, base={"id": "acme/tiny", "revision": "r1"})
    undeclared = TinyRecipe().build_model(SEED)
    undeclared.load_state_dict(load_file(str(root / "base.safetensors")))
    return {"ledger": path, "base": root / "base.safetensors", "other": root / "other.safetensors",
            "undeclared": record(root / "U", recipe, model=undeclared)}


def test_declared_base_given_with_base_passes(based):
    init = init_of(based["ledger"], TinyRecipe(), base=based["base"])
    assert init.status == "pass" and init.detail.startswith("fine-tuned from acme/tiny (revision r1)")
    assert "do not apply to a declared base" in init.detail
    assert init_of(based["ledger"], None, base=based["base"]).status == "pass"  # no recipe needed


def test_lineage_against_the_declared_base_is_expected_ancestry(based):
    """--against the declared base: derived from it, but declared — reported, not failed; the same
    weights undeclared fail as derived."""
    ledger_path = based["ledger"]
    final = ledger_path.parent / f"{ledger_path.name}.safetensors"
    report = verify_ledger(ledger_path, key=SIGNER.public, model=final, base=based["base"],
                           against=[based["base"]])
    entry = report.check("independence").data["against"][0]
    assert entry["verdict"] == "derived from the declared base (acme/tiny)", entry
    assert report.check("independence").status == "warn" and report.verdict == "pass"
    undeclared = based["undeclared"]
    report = verify_ledger(undeclared, key=SIGNER.public, model=undeclared.parent / f"{undeclared.name}.safetensors",
                           against=[based["base"]])
    assert report.check("independence").data["against"][0]["verdict"] == "derived" and report.verdict == "fail"


def test_declared_base_with_another_file_fails_naming_tensors(based):
    init = init_of(based["ledger"], TinyRecipe(), base=based["other"])
    assert init.status == "fail" and init.data["differ"] == ["0.bias", "0.weight", "1.bias", "1.weight", "4.bias",
                                                             "4.weight"]
    assert "other.safetensors differs from the init in 6 of 6 tensor(s): 0.bias" in init.detail


def test_declared_base_without_base_file_warns(based):
    init = init_of(based["ledger"], TinyRecipe())
    assert init.status == "warn"
    assert init.detail.startswith("declares fine-tuning from acme/tiny (revision r1): give --base FILE to check it")


def test_undeclared_base_fails(based):
    init = init_of(based["undeclared"], TinyRecipe(), base=based["base"])
    assert init.status == "fail" and "undeclared fine-tuning" in init.detail and len(init.data["differ"]) == 6


def test_declared_base_with_a_new_head_regenerates_the_head_from_the_recipe(tmp_path, based):
    body = {k: v for k, v in load_file(str(based["base"])).items() if not k.startswith("4.")}
    save_file(body, str(tmp_path / "body.safetensors"))
    recipe = TinyRecipe()
    model = recipe.build_model(SEED)  # the head (4.weight, 4.bias) stays the recipe's draw
    model.load_state_dict(body, strict=False)
    path = record(tmp_path / "L", recipe, model=model, base={"id": "acme/tiny-body"})
    init = init_of(path, recipe, base=tmp_path / "body.safetensors")
    assert init.status == "pass" and init.data["regenerated"] == ["4.bias", "4.weight"]
    assert "fine-tuned from acme/tiny-body: 4 init tensors equal body.safetensors; 2 tensor(s) outside the base " \
           f"regenerated from the recipe at seed {SEED}" in init.detail
    assert init_of(path, None, base=tmp_path / "body.safetensors").status == "warn"


def test_missing_base_file_cannot_run(based, tmp_path):
    with pytest.raises(ConfigurationError, match="--base file"):
        verify_ledger(based["ledger"], key=SIGNER.public, base=tmp_path / "nope.safetensors")


# ----------------------------------------------------------------------------- 5. disclosure
class Peeking(TinyRecipe):
    """Honest init, but build_model reads a weights file (and drops it: its mapping is gone on return)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def build_model(self, seed: int) -> nn.Module:
        load_file(str(self.path))
        return super().build_model(seed)


def test_weights_opened_by_build_model_are_disclosed(tmp_path, foreign):
    recipe = Peeking(foreign["file"])
    init = init_of(record(tmp_path / "L", recipe), recipe)
    assert init.status == "warn" and init.data["opened"] == [str(foreign["file"])]
    assert "the recipe opened weights-like files while building the model" in init.detail
    assert "F.safetensors" in init.detail and "(disclosure, not proof)" in init.detail


# ----------------------------------------------------------------------------- 6. recipe errors
class Raising(TinyRecipe):
    def build_model(self, seed: int) -> nn.Module:
        raise ValueError("no such device:\n cuda:7")


class NoModel(TinyRecipe):
    def build_model(self, seed: int) -> Any:
        return {"weight": seed}


def test_a_recipe_that_raises_makes_init_warn(tmp_path):
    path = record(tmp_path / "L", TinyRecipe())
    report = verify_ledger(path, key=SIGNER.public, recipe=Raising(), replay=0, replay_seed=1)
    init = report.check("init")
    assert init.status == "warn" and init.summary == "the recipe raised"
    assert init.detail == f"the recipe raised while building the model at seed {SEED}: ValueError: no such device: " \
        "cuda:7"
    assert report.check("chain").status == "pass" and report.check("continuity").status != "skip"
    assert report.verdict != "fail"  # the other checks ran; a warning is no failure
    wrong = verify_ledger(path, key=SIGNER.public, recipe=NoModel(), replay=0).check("init")
    assert wrong.status == "warn" and "TypeError: build_model returned a dict, not a torch.nn.Module" in wrong.detail


RECIPE_FILE = '''
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from recipes import TinyRecipe

PEEK = np.load({npy!r})  # read while the recipe is imported


class Raising(TinyRecipe):
    def build_model(self, seed):
        raise RuntimeError("out of memory")


recipe = Raising()
honest = TinyRecipe()
'''


def test_cli_recipe_errors_and_import_time_disclosure(tmp_path):
    from ledger._crypto import public_key_pem

    np.save(tmp_path / "peek.npy", np.zeros(3, dtype=np.float32))
    (tmp_path / "rec.py").write_text(RECIPE_FILE.format(tests=str(TESTS), npy=str(tmp_path / "peek.npy")))
    path = record(tmp_path / "L", TinyRecipe())
    pub = tmp_path / "trainer.pub"
    pub.write_bytes(public_key_pem(SIGNER.public.raw))
    command = [sys.executable, "-m", "ledger", "verify", str(path), "--key", str(pub), "--replay", "0"]
    out = subprocess.run(command + ["--recipe", f"{tmp_path / 'rec.py'}:recipe"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.split()[:2] == ["init", "warn"]]
    assert len(lines) == 1 and "the recipe raised while building the model at seed 3: RuntimeError: out of memory" \
        in lines[0], out.stdout
    report = verify_ledger(path, key=SIGNER.public, recipe=f"{tmp_path / 'rec.py'}:honest", replay=0)
    init = report.check("init")
    assert init.status == "warn" and init.data["opened"] == [str(tmp_path / "peek.npy")]
    missing = subprocess.run(command + ["--base", str(tmp_path / "nope.safetensors")], capture_output=True, text=True)
    assert missing.returncode == 2 and "--base file" in missing.stderr


def test_verify_help_names_base():
    from click.testing import CliRunner

    from ledger._cli import cli

    result = CliRunner().invoke(cli, ["verify", "--help"])
    assert "--base FILE" in result.output and "fine-tuning" in result.output


def test_canonical_state_is_what_init_draws():
    tensors, _ = canonical_state(BufferedRecipe().build_model(0))
    assert {"pe", "mask"} <= set(tensors)


def test_a_recipe_returning_the_foreign_model_at_the_genesis_seed_is_not_an_identical_init(tmp_path):
    """F (lightly trained, still init-like) returned at the genesis seed only, honest draws elsewhere:
    without --against nothing can see it (documented); with --against F the init *is* F — not the
    identical init two labs with one seed share, which training would have moved away from."""
    foreign = trained(TinyRecipe(), 99, 30)
    save_model(foreign, str(tmp_path / "F.safetensors"))

    class Special(TinyRecipe):
        def build_model(self, seed: int) -> nn.Module:
            model = super().build_model(seed)
            if seed == SEED:
                model.load_state_dict(foreign.state_dict())
            return model

    recipe = Special()
    init = init_of(record(tmp_path / "L", recipe), recipe, against=[tmp_path / "F.safetensors"])
    assert init.status == "fail" and init.data["against"][0]["outcome"] == "is the foreign model"
    assert "the init is F.safetensors itself" in init.detail


def test_a_parameter_genesis_calls_a_buffer_or_a_size_it_misstates_fails_against_the_recipe(tmp_path):
    """Buffers are exempt from the seed test, the optimizer bounds and the sketches, and genesis's
    word for each tensor is the trainer's: the recipe's model says which are parameters."""
    from test_provenance import resign, restate

    recipe = TinyRecipe()
    honest = record(tmp_path / "honest", recipe)
    assert init_of(honest, recipe).data["relabelled"] == []
    (honest / "checkpoints").mkdir(exist_ok=True)
    init = init_of(resign(honest, tmp_path / "forged", restate("0.weight", kind="buffer")), recipe)
    assert init.status == "fail" and init.data["relabelled"] == ["0.weight"], init.detail
    assert init.detail.startswith("genesis calls 1 parameter(s) of the recipe's model buffers (0.weight)")
    inflated = restate("0.weight", shape=[1600, 8])  # the Adam bound grows with √size
    init = init_of(resign(honest, tmp_path / "inflated", inflated), recipe)
    assert init.status == "fail" and init.data["reshaped"] == ["0.weight"], init.detail


def test_a_declared_base_does_not_exempt_genesis_from_the_recipes_model(based, tmp_path):
    """Fine-tuning runs took another path through ``init`` that never compared genesis's words with
    the recipe's model (review): a parameter called a buffer fails there too."""
    import shutil

    from test_provenance import resign, restate

    source = shutil.copytree(based["ledger"], tmp_path / "honest")  # the fixture's ledger stays as it is
    (source / "checkpoints").mkdir(exist_ok=True)
    init = init_of(resign(source, tmp_path / "forged", restate("4.weight", kind="buffer")), TinyRecipe(),
                   base=based["base"])
    assert init.status == "fail" and init.data["relabelled"] == ["4.weight"], init.detail
