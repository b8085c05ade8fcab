"""The recorder's cost budget: what every step carries, how the optional fingerprints are scheduled,
and that what genesis and the entries state is what was recorded."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXED_SEED
from recipes import TinyRecipe
from torch.nn import functional as F

import ledger
from ledger import Kind, Signer
from ledger.errors import ConfigurationError
from ledger.hooks import FingerprintOptions, Recorder
from ledger.hooks._options import DRAIN_INTERVAL, SHARES, Cadence, check_queue, writer_interval
from ledger.torch import BatchLeaves, batch_digest, torch_digests
from ledger.verify import verify_ledger

SIGNER = Signer.from_seed(FIXED_SEED)


def record(path: Path, steps: int = 12, optimizer: str = "adamw", **options: object) -> Recorder:
    """A TinyRecipe run of ``steps`` steps; the recorder (closed, sealed with the final weights)."""
    recipe = TinyRecipe()
    model = recipe.build_model(3)
    opt = recipe.build_optimizer(model) if optimizer == "adamw" else \
        torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4)
    rec = Recorder(path, model=model, optimizer=opt, key=SIGNER, seed=3, checkpoint_every=6,
                   fingerprints=FingerprintOptions(**options))  # type: ignore[arg-type]
    for s in range(steps):
        x, y = recipe.batch(s)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        rec.step(loss=loss, batch=(x, y))
    rec.close(final_weights=path.parent / f"{path.name}.safetensors")
    return rec


def step_bodies(path: Path) -> list[dict[str, object]]:
    return [e.body() for e in ledger.open(path).entries() if e.kind is Kind.STEP]


def test_every_entry_carries_exactly_what_the_fixed_cadence_states(tmp_path):
    record(tmp_path / "L", sketch=3, digests=4, batch=2)
    for s, body in enumerate(step_bodies(tmp_path / "L")):
        expected = ["norms"] + [kind for kind, n in (("sketch", 3), ("digests", 4), ("batch", 2)) if s % n == 0]
        assert body["carries"] == expected, s
        assert ("sketch" in body) == (s % 3 == 0) and ("tensor_digests" in body) == (s % 4 == 0)
        assert ("batch_digest" in body) == (s % 2 == 0) and body["norms"].shape == (6,) and "lrs" in body
    genesis = ledger.open(tmp_path / "L").genesis()["fingerprints"]
    assert (genesis["sketch"], genesis["digests"], genesis["batch"]) == (3, 4, 2)
    assert genesis["overhead_budget"] == 0.01 and genesis["grad_norms"] == "auto"
    report = verify_ledger(tmp_path / "L", key=SIGNER.public, model=tmp_path / "L.safetensors")
    continuity = report.check("continuity")
    assert report.verdict == "pass" and continuity.data["sketch_steps_checked"] == 4
    # pinned beyond the norms at the init, sketches 0 3 6 9, checkpoints 5 11: at most 3 steps apart
    assert continuity.data["localisation_steps"] == 3 and "localised to ≤ 3 step(s)" in continuity.detail
    record(tmp_path / "M", sketch=0)
    continuity = verify_ledger(tmp_path / "M", key=SIGNER.public, model=tmp_path / "M.safetensors").check("continuity")
    assert continuity.data["localisation_steps"] == 6 and "localised to ≤ 6 step(s)" in continuity.detail


def test_budget_none_takes_every_optional_fingerprint_every_step(tmp_path):
    record(tmp_path / "L", budget=None)
    assert all(b["carries"] == ["norms", "sketch", "digests", "batch"] for b in step_bodies(tmp_path / "L"))
    assert ledger.open(tmp_path / "L").genesis()["fingerprints"]["overhead_budget"] is None


def test_gradient_norms_are_read_only_when_the_update_bound_uses_them(tmp_path):
    record(tmp_path / "adamw")
    record(tmp_path / "sgd", optimizer="sgd")
    record(tmp_path / "forced", grad_norms="every")
    assert not any("grad_norms" in b or "grad_norm" in b["metrics"] for b in step_bodies(tmp_path / "adamw"))
    for name in ("sgd", "forced"):
        bodies = step_bodies(tmp_path / name)
        assert all(b["grad_norms"].shape == (1,) and b["metrics"]["grad_norm"] > 0 for b in bodies)
    for name in ("adamw", "sgd"):  # SGD's bound has its gradient norms; AdamW's needs none
        report = verify_ledger(tmp_path / name, key=SIGNER.public, model=tmp_path / f"{name}.safetensors")
        assert report.verdict == "pass" and report.check("continuity").status == "pass", report.to_dict()["checks"]


def test_the_budget_sets_each_interval_from_measured_costs():
    cadence = Cadence(FingerprintOptions())
    assert cadence.state() == (1, 1, 1) and all(cadence.due(kind, 0) for kind in SHARES)  # step 0 measures each
    cadence.periods.extend([0.100] * 5)  # a 100 ms step: 1 ms budget
    for kind, cost in (("sketch", 0.002), ("digests", 0.0001), ("batch", 0.0005)):
        cadence.costs[kind].append(cost)
    cadence.calibrate()  # sketch: 2 ms / 0.4 ms → every 5; digests 0.1 ms ≤ 0.4 ms → every step; batch 0.5/0.2 → 3
    assert cadence.every == {"sketch": 5, "digests": 1, "batch": 3}
    assert [s for s in range(12) if cadence.due("sketch", s)] == [0, 5, 10]
    fixed = Cadence(FingerprintOptions(sketch=7, digests="checkpoints", batch="every"))
    fixed.periods.append(1e-6)
    for kind in SHARES:
        fixed.costs[kind].append(1.0)
    fixed.calibrate()  # fixed intervals are not the budget's to change
    assert fixed.state() == (7, 0, 1) and not any(fixed.due("digests", s) for s in range(10))
    unlimited = Cadence(FingerprintOptions(budget=None))
    unlimited.periods.append(1e-6)
    unlimited.costs["sketch"].append(1.0)
    unlimited.calibrate()
    assert unlimited.state() == (1, 1, 1)


def test_one_slow_measurement_cannot_put_a_kind_out_of_reach_of_the_next_ones():
    """A sketch preempted once (267 ms instead of 1 ms) would set an interval of thousands of
    steps, and no later sketch would come to correct it: an interval grows at most to 50 steps or
    fourfold per calibration, so the next measurements arrive and the median settles."""
    cadence = Cadence(FingerprintOptions())
    cadence.periods.extend([0.028] * 5)  # charlm: a 28 ms step, 0.112 ms for the sketch
    cadence.measured("sketch", 0.5)  # the warm-up
    cadence.measured("sketch", 0.267)
    cadence.calibrate()
    assert cadence.every["sketch"] == 50  # not 2384
    cadence.measured("sketch", 0.001)  # the sketch of step 50
    cadence.calibrate()
    assert cadence.every["sketch"] == 200  # median 134 ms would ask for 1197: fourfold at most
    for _ in range(3):  # calibrations without a new sketch: no further growth
        cadence.calibrate()
        assert cadence.every["sketch"] == 200
    cadence.measured("sketch", 0.001)  # step 200: the median is an honest measurement again
    cadence.calibrate()
    assert cadence.every["sketch"] == 9
    costly = Cadence(FingerprintOptions())  # honestly expensive: 2 s digests of a 0.5 s step want 1000
    costly.periods.extend([0.5] * 5)
    taken = []
    for step in range(1200):
        costly.tick(step)
        if costly.due("digests", step):
            taken.append(step)
            costly.measured("digests", 2.0)
    assert taken == [0, 1, 50, 200, 1000]  # the ramp: capped until three measurements agree


def test_the_first_cost_is_a_warm_up_and_calibration_follows_the_recorders_first_step():
    cadence = Cadence(FingerprintOptions())
    cadence.measured("sketch", 5.0)  # the first sketch builds its plan: not what the next ones cost
    cadence.measured("sketch", 0.001)
    assert list(cadence.costs["sketch"]) == [0.001]
    # a resumed recorder starting at step 700 calibrates at its third step, then every 50
    assert [s for s in range(700, 860) if cadence.tick(s)] == [702, 752, 802, 852]


def test_an_auto_run_states_in_its_entries_what_the_budget_chose(tmp_path):
    rec = record(tmp_path / "L", steps=130, sketch="auto", digests="auto")  # recalibrated at steps 2, 52, 102
    bodies = step_bodies(tmp_path / "L")
    sketched = [s for s, b in enumerate(bodies) if "sketch" in b["carries"]]
    assert sketched[0] == 0 and all(("sketch" in b) == ("sketch" in b["carries"]) for b in bodies)
    assert sketched[:2] == [0, 1]  # measured twice before the first calibration
    after = [s for s in sketched if s >= 102]  # the last calibration's interval holds from step 102 on
    n = rec._cadence.every["sketch"]
    assert after == [s for s in range(102, 130) if s % n == 0]
    report = verify_ledger(tmp_path / "L", key=SIGNER.public, model=tmp_path / "L.safetensors")
    assert report.verdict == "pass", report.to_dict()["checks"]


def test_a_small_batch_is_copied_and_digested_later_a_large_one_at_once():
    x = torch.arange(12.0).reshape(3, 4)
    batch = {"x": x, "y": torch.tensor([1, 2, 3]), "n": 3, "t": x.t()}
    expected = batch_digest(batch)
    later = BatchLeaves(batch)
    x += 1  # the caller reuses its buffer before the writer thread digests the copy
    assert later.digest() == expected
    now = BatchLeaves({"x": x, "y": torch.tensor([1, 2, 3]), "n": 3, "t": x.t()}, copy_below=0)
    x -= 1
    assert now.digest() != expected and now.digest() == batch_digest({"x": x + 1, "y": torch.tensor([1, 2, 3]),
                                                                      "n": 3, "t": (x + 1).t()})
    assert torch_digests({"w": x})  # the live tensor is untouched by either path


def test_a_flat_tuple_or_list_of_tensors_digests_as_its_pytree_does():
    """A tuple or list of plain tensors skips tree_flatten; its digest is the one of the same leaves
    flattened from a nested batch (the digest depends on the leaves in order), copied or not."""
    x, y = torch.arange(12.0).reshape(3, 4), torch.tensor([1, 2, 3])
    nested = batch_digest(((x, y),))
    for flat in ((x, y), [x, y]):
        assert BatchLeaves(flat).digest() == BatchLeaves(flat, copy_below=0).digest() == nested
    later = BatchLeaves((x, y))
    x += 1  # a flat batch is copied too
    assert later.digest() == nested != batch_digest((x, y))
    param = torch.nn.Parameter(x.clone())  # a tensor subclass goes through tree_flatten
    assert BatchLeaves((param, y)).digest() == batch_digest(((param, y),))


@pytest.mark.parametrize("options, message", [
    ({"budget": 0}, "budget must be"), ({"budget": 1.5}, "budget must be"), ({"sketch": -1}, "sketch must be"),
    ({"digests": "sometimes"}, "digests must be"), ({"batch": "checkpoints"}, "batch must be"),
    ({"grad_norms": "never"}, "grad_norms must be")])
def test_bad_options_are_refused_with_one_line(options, message):
    with pytest.raises(ConfigurationError, match=message):
        FingerprintOptions(**options)  # type: ignore[arg-type]


def test_an_sgd_ledger_without_gradient_norms_fails_continuity(tmp_path, monkeypatch):
    """The forger drops the gradient norms SGD's bound is built from (and swaps foreign weights in):
    an unbounded step is a failure, not a pass resting on nothing."""
    import ledger.hooks._recorder as recorder_module

    monkeypatch.setattr(recorder_module, "reads_gradients", lambda optimizer, policy: False)
    recipe = TinyRecipe()
    foreign = recipe.build_model(99).state_dict()
    model = recipe.build_model(3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    rec = Recorder(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, seed=3, checkpoint_every=6,
                   fingerprints=FingerprintOptions(sketch=4))
    for s in range(12):
        x, y = recipe.batch(s)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if s == 6:
            model.load_state_dict(foreign)
        rec.step(batch=(x, y))
    rec.close(final_weights=tmp_path / "L.safetensors")
    assert not any("grad_norms" in b for b in step_bodies(tmp_path / "L"))
    continuity = verify_ledger(tmp_path / "L", key=SIGNER.public, model=tmp_path / "L.safetensors").check("continuity")
    assert continuity.status == "fail"
    assert "no gradient norms: the SGD update bound cannot be formed" in continuity.detail


def test_genesis_fingerprint_policies_out_of_range_are_refused(tmp_path):
    from ledger._schema import FingerprintPolicy
    from ledger.errors import FormatError

    good = {"tensor_order": ["w"], "sketch_k": 256, "sketch_seed": 1, "sketch": "auto", "digests": 3,
            "batch": "auto", "overhead_budget": None, "grad_norms": "auto"}
    assert FingerprintPolicy.from_body(good).overhead_budget is None
    for key, value in (("digests", -5), ("batch", "checkpoints"), ("sketch", 2**63), ("overhead_budget", -3),
                       ("overhead_budget", float("nan")), ("grad_norms", "never"), ("sketch", True)):
        with pytest.raises(FormatError, match=key):
            FingerprintPolicy.from_body({**good, key: value})


def test_a_batch_the_digest_refuses_is_refused_on_the_training_thread_and_copies_are_bounded():
    with pytest.raises(ConfigurationError, match="cannot be fingerprinted"):
        BatchLeaves((torch.zeros(2, dtype=torch.complex64),))
    from ledger.torch import CopyAllowance

    allowance = CopyAllowance(100)
    x = torch.ones(20)  # 80 bytes
    first, second = BatchLeaves(x, allowance=allowance), BatchLeaves(x, allowance=allowance)
    assert allowance.held == 80  # the second is digested at once: no room left for its copy
    assert first.digest() == second.digest() == batch_digest(x) and allowance.held == 0


def test_writer_rounds_default_to_a_quarter_second_within_a_quarter_of_max_lag() -> None:
    """The writer thread drains in rounds of DRAIN_INTERVAL (several entries a round: less CPU per
    entry), never longer than max_lag/4, so a put rarely waits for the lag bound; an explicit
    interval is taken as given, and nonsense is refused."""
    assert DRAIN_INTERVAL == 0.25
    assert writer_interval(None, 1.0) == 0.25
    assert writer_interval(None, 0.4) == pytest.approx(0.1)
    assert writer_interval(0.05, 1.0) == 0.05 and writer_interval(30.0, 1.0) == 30.0
    check_queue(256, None, 1.0)  # the default passes
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigurationError, match="drain_interval and max_lag"):
            check_queue(256, bad, 1.0)


def test_a_checkpoint_snapshot_is_written_at_once_not_at_the_next_round(tmp_path):
    """A snapshot is a copy of the training state: at the default rounds its job wakes the writer
    thread instead of waiting for the next round, so snapshots do not pile up in memory (here the
    round is made 30 s long)."""
    recipe = TinyRecipe()
    model = recipe.build_model(3)
    opt = recipe.build_optimizer(model)
    rec = Recorder(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, seed=3, checkpoint_every=2,
                   max_lag=120.0)
    assert rec._queue._interval == 0.25  # the default's min(0.25 s, max_lag / 4)
    rec._queue._interval = 30.0  # from the thread's next round on: cycle it once into a 30 s wait
    rec._queue._wake.set()
    time.sleep(0.3)
    for s in range(2):
        x, y = recipe.batch(s)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        rec.step(loss=0.5)
    deadline = time.monotonic() + 10
    while rec._writer.next_seq < 5 and time.monotonic() < deadline:  # genesis, init checkpoint, 2 steps, checkpoint
        time.sleep(0.01)
    assert rec._writer.next_seq == 5 and rec._checkpoints.last_step == 1
    rec.close()


def test_two_optimizers_one_idle_record_each_groups_rate_at_the_step(tmp_path):
    """Only one of two optimizers steps at odd steps: the entry still lists both optimizers'
    groups, the idle one's learning rate as it was at rec.step (read on the training thread, not
    when the writer thread builds the body), zero gradient norms for it, and the steps of each."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    a = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    b = torch.optim.SGD(model[2].parameters(), lr=0.05, momentum=0.5)
    rec = Recorder(tmp_path / "L", model=model, optimizer=[a, b], key=SIGNER, seed=0, checkpoint_every=3,
                   drain_interval=30.0)  # the bodies are built long after the rates change below
    expected = {}
    for s in range(6):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        a.zero_grad()
        b.zero_grad()
        loss.backward()
        rates = (a.param_groups[0]["lr"], b.param_groups[0]["lr"])
        a.step()
        if s % 2 == 0:
            b.step()
        rec.step(loss=loss)
        expected[s] = rates
        for opt in (a, b):
            opt.param_groups[0]["lr"] *= 0.5  # a scheduler moves both rates after the entry
    rec.close()
    for s, body in enumerate(step_bodies(tmp_path / "L")):
        assert list(body["lrs"]) == list(expected[s]), s
        assert list(body["optimizer_steps_each"]) == [1, 1 if s % 2 == 0 else 0]
        assert body["grad_norms"][0] > 0 and (body["grad_norms"][1] > 0) == (s % 2 == 0)
    assert verify_ledger(tmp_path / "L", key=SIGNER.public).check("chain").status.name == "PASS"


def test_a_cpu_float32_model_launches_nothing_for_its_norms():
    """Every float32 CPU tensor is summed by numpy on views: no lane launch at all; an integer
    buffer or a half tensor still goes through the lane, and the norms are the exact ones."""
    from ledger._device import NOTHING, lane_for
    from ledger.hooks._norms import Norms

    tensors = [torch.randn(70000), torch.randn(3, 3)]
    lane = lane_for(torch.device("cpu"))
    launched = []
    original = lane.launch
    lane.launch = lambda work, reads: launched.append(1) or original(work, reads)  # type: ignore[method-assign]
    try:
        pending = Norms(tensors).measure(tensors)
        assert pending.landing is NOTHING and not launched
        assert np.allclose(pending.value(), [float(t.double().norm()) for t in tensors], rtol=1e-6)
        mixed = [*tensors, torch.tensor(3), torch.randn(4).half()]
        Norms(mixed).measure(mixed).value()
        assert launched == [1]
    finally:
        del lane.launch
