"""Lineage sees through permuted copies: the residual stream is aligned through the embeddings first.

Two tiny transformers, one with BERT's tensor names and torch Linear (out, in) matrices, one with
GPT-2's names and Conv1D (in, out) matrices. A copy of a foreign model F whose residual stream and MLP
hidden units are consistently permuted computes exactly what F computes; it, and the same copy
fine-tuned, must come out "derived", while independent models must not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ledger.verify._lineage import DERIVED_ALPHA, Lineage, compare

VOCAB, CONTEXT, DIM, HIDDEN, LAYERS = 128, 16, 32, 128, 2


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


class BertLayer(nn.Module):
    """Post-norm block named as in BERT: one-head attention, then the MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({name: nn.Linear(DIM, DIM) for name in ("query", "key", "value")}),
            "output": nn.ModuleDict({"dense": nn.Linear(DIM, DIM), "LayerNorm": nn.LayerNorm(DIM)})})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(DIM, HIDDEN)})
        self.output = nn.ModuleDict({"dense": nn.Linear(HIDDEN, DIM), "LayerNorm": nn.LayerNorm(DIM)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads, out = self.attention["self"], self.attention["output"]
        x = out["LayerNorm"](x + out["dense"](_attend(heads["query"](x), heads["key"](x), heads["value"](x))))
        return self.output["LayerNorm"](x + self.output["dense"](F.gelu(self.intermediate["dense"](x))))


class BertLike(nn.Module):
    """Word + position embeddings, BERT blocks, logits through the tied word embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.ModuleDict({"word_embeddings": nn.Embedding(VOCAB, DIM),
                                         "position_embeddings": nn.Embedding(CONTEXT, DIM),
                                         "LayerNorm": nn.LayerNorm(DIM)})
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(BertLayer() for _ in range(LAYERS))})

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        words, positions = self.embeddings["word_embeddings"], self.embeddings["position_embeddings"]
        x = self.embeddings["LayerNorm"](words(tokens) + positions(torch.arange(tokens.shape[1])))
        for layer in self.encoder["layer"]:
            x = layer(x)
        return x @ words.weight.T


class Conv1D(nn.Module):
    """GPT-2's linear map: weight stored (in, out), y = x W + b."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / math.sqrt(n_in))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Gpt2Block(nn.Module):
    """Pre-norm block named as in GPT-2: causal one-head attention, then the MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.ModuleDict({"c_attn": Conv1D(DIM, 3 * DIM), "c_proj": Conv1D(DIM, DIM)})
        self.mlp = nn.ModuleDict({"c_fc": Conv1D(DIM, 4 * DIM), "c_proj": Conv1D(4 * DIM, DIM)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn["c_attn"](self.ln_1(x)).split(DIM, dim=-1)
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)
        attended = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM) + mask, dim=-1) @ v
        x = x + self.attn["c_proj"](attended)
        return x + self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln_2(x))))


class Gpt2Like(nn.Module):
    """Token + position embeddings, GPT-2 blocks, a final norm, logits through the tied token embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, DIM), nn.Embedding(CONTEXT, DIM)
        self.h = nn.ModuleList(Gpt2Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(DIM)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


# Which axis of each tensor is the residual stream ("res"), an MLP's hidden units ("hid"), or neither (None).
AXES: dict[str, list[tuple[str, tuple[str | None, ...]]]] = {
    "bert": [(r"_embeddings\.weight$", (None, "res")), (r"LayerNorm\.(weight|bias)$", ("res",)),
             (r"\.(query|key|value)\.weight$", (None, "res")), (r"\.(query|key|value)\.bias$", (None,)),
             (r"attention\.output\.dense\.weight$", ("res", None)), (r"attention\.output\.dense\.bias$", ("res",)),
             (r"intermediate\.dense\.weight$", ("hid", "res")), (r"intermediate\.dense\.bias$", ("hid",)),
             (r"output\.dense\.weight$", ("res", "hid")), (r"output\.dense\.bias$", ("res",))],
    "gpt2": [(r"^w[tp]e\.weight$", (None, "res")), (r"ln_[12f]\.(weight|bias)$", ("res",)),
             (r"attn\.c_attn\.weight$", ("res", None)), (r"attn\.c_attn\.bias$", (None,)),
             (r"attn\.c_proj\.weight$", (None, "res")), (r"attn\.c_proj\.bias$", ("res",)),
             (r"mlp\.c_fc\.weight$", ("res", "hid")), (r"mlp\.c_fc\.bias$", ("hid",)),
             (r"mlp\.c_proj\.weight$", ("hid", "res")), (r"mlp\.c_proj\.bias$", ("res",))],
}
MODELS: dict[str, Callable[[], nn.Module]] = {"bert": BertLike, "gpt2": Gpt2Like}


def permute(state: dict[str, torch.Tensor], naming: str, residual: torch.Tensor | None,
            hidden: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """The state dict with the residual stream permuted by ``residual`` (every residual axis, norm
    gains and embeddings included; None leaves it) and layer ℓ's MLP hidden units by ``hidden[ℓ]``:
    new coordinate i is old coordinate perm[i], so the model computes the same function."""
    out = {}
    for name, tensor in state.items():
        axes = next(spec for pattern, spec in AXES[naming] if re.search(pattern, name))
        layer = re.search(r"\.(\d+)\.", name)
        for axis, kind in enumerate(axes):
            perm = residual if kind == "res" else hidden[int(layer.group(1))] if kind == "hid" and layer else None
            if perm is not None:
                tensor = tensor.index_select(axis, perm)
        out[name] = tensor.clone()
    return out


def batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and a learnable target (a fixed map of each token)."""
    tokens = torch.randint(0, VOCAB, (16, CONTEXT), generator=generator)
    return tokens, (3 * tokens + 1) % VOCAB


def build(naming: str, seed: int, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[naming]()
    if state is not None:
        model.load_state_dict(state)
    return model


def trained(model: nn.Module, data_seed: int, steps: int = 100) -> nn.Module:
    """The model after ``steps`` steps of Adam (lr 1e-3) on random batches drawn from ``data_seed``."""
    generator = torch.Generator().manual_seed(data_seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        tokens, targets = batch(generator)
        optimizer.zero_grad()
        F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).backward()
        optimizer.step()
    return model


def weights(model: nn.Module | dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return {name: t.detach().numpy().astype(np.float32) for name, t in state.items()}


def permutations(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A seed's residual permutation and per-layer hidden permutations."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(DIM, generator=generator), [torch.randperm(HIDDEN, generator=generator)
                                                      for _ in range(LAYERS)]


def report(naming: str, case: str, result: Lineage) -> None:
    print(f"\n{naming:5} {case:44} {result.verdict:24} p {result.p_value:9.3g}  csu {result.p_csu:9.3g}  "
          f"match {result.p_match:9.3g}  aligned {result.residual_aligned}  matrices {result.matrices}  "
          f"MLP pairs {result.mlp_pairs}")


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def foreign(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    """(naming, F): the foreign model, trained 100 steps from seed 0."""
    return request.param, trained(build(request.param, 0), data_seed=0)


@pytest.mark.parametrize("naming", ["bert", "gpt2"])
def test_the_permutation_preserves_the_function(naming):
    model = build(naming, 0)
    residual, hidden = permutations(1)
    copy = build(naming, 1, permute(model.state_dict(), naming, residual, hidden))
    tokens, _ = batch(torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(copy(tokens), model(tokens), rtol=1e-4, atol=1e-4)
    moved = copy.state_dict()
    assert all(not torch.equal(moved[n], t) for n, t in model.state_dict().items() if n.endswith("weight")
               and t.ndim == 2)


def test_an_independent_init_is_not_derived(foreign):
    naming, f = foreign
    result = compare(weights(build(naming, 1)), weights(f))
    report(naming, "independent init vs F", result)
    assert result.verdict != "derived" and result.p_value > 1e-3 and result.residual_aligned


def test_a_hidden_permuted_copy_is_derived(foreign):
    naming, f = foreign
    _, hidden = permutations(2)
    result = compare(weights(permute(f.state_dict(), naming, None, hidden)), weights(f))
    report(naming, "hidden-permuted F vs F", result)
    assert result.verdict == "derived" and result.p_value < DERIVED_ALPHA
    assert result.mlp_pairs == LAYERS  # up and down paired by layer and shape, whatever the module names


def test_a_residual_and_hidden_permuted_copy_is_derived(foreign):
    naming, f = foreign
    copy = permute(f.state_dict(), naming, *permutations(3))
    result = compare(weights(copy), weights(f))
    report(naming, "residual+hidden-permuted F vs F", result)
    assert result.verdict == "derived" and result.p_value < DERIVED_ALPHA and result.p_match < DERIVED_ALPHA
    assert result.residual_aligned and "aligned through" in result.reason
    residual_only = compare(weights(permute(f.state_dict(), naming, permutations(3)[0], [None] * LAYERS)),
                            weights(f))
    report(naming, "residual-permuted F vs F", residual_only)  # the constrained test sees it on its own
    assert residual_only.verdict == "derived" and residual_only.p_csu < DERIVED_ALPHA


def test_without_embeddings_the_residual_stream_is_not_aligned_and_the_reason_says_so(foreign):
    naming, f = foreign
    ours = weights(permute(f.state_dict(), naming, *permutations(3)))
    keep = [n for n in ours if not re.search(r"embeddings|^w[tp]e\.", n)]
    result = compare({n: ours[n] for n in keep}, {n: weights(f)[n] for n in keep})
    report(naming, "res+hidden-permuted F vs F, no embeddings", result)
    assert not result.residual_aligned and "would go unseen" in result.reason


@pytest.mark.slow
def test_a_permuted_then_fine_tuned_copy_is_derived(foreign):
    naming, f = foreign
    copy = trained(build(naming, 5, permute(f.state_dict(), naming, *permutations(4))), data_seed=7)
    result = compare(weights(copy), weights(f))
    report(naming, "residual+hidden-permuted F, fine-tuned, vs F", result)
    assert result.verdict == "derived" and result.p_value < DERIVED_ALPHA


@pytest.mark.slow
def test_an_independently_trained_model_is_not_derived(foreign):
    naming, f = foreign
    result = compare(weights(trained(build(naming, 1), data_seed=1)), weights(f))
    report(naming, "independently trained vs F", result)
    assert result.verdict != "derived" and result.p_value > 1e-3


@pytest.mark.parametrize("naming", ["bert", "gpt2"])
def test_a_recipe_returning_a_permuted_foreign_init_is_caught_by_comparing_two_of_its_inits(naming):
    hidden_foreign = build(naming, 99).state_dict()  # what a laundering recipe would return, per seed:

    def laundered(seed: int) -> dict[str, np.ndarray]:
        generator = torch.Generator().manual_seed(seed)
        noisy = {n: t + 0.05 * t.std().nan_to_num() * torch.randn(t.shape, generator=generator)
                 for n, t in hidden_foreign.items()}
        return weights(permute(noisy, naming, *permutations(seed)))

    honest = compare(weights(build(naming, 1)), weights(build(naming, 2)))
    report(naming, "init(1) vs init(2)", honest)
    assert honest.verdict != "derived" and honest.p_value > 1e-3
    result = compare(laundered(1), laundered(2))
    report(naming, "laundered init(1) vs laundered init(2)", result)
    assert result.verdict == "derived" and result.p_value < DERIVED_ALPHA
    against_source = compare(laundered(1), weights(hidden_foreign))
    report(naming, "laundered init(1) vs its foreign source", against_source)
    assert against_source.verdict == "derived" and against_source.p_value < DERIVED_ALPHA
