"""The Hugging Face Trainer callback on real ``transformers.Trainer`` runs (a tiny GPT-2 built from
its config, synthetic tokens, CPU): entries per optimizer step, the true per-step loss and batch,
the real CLI's verdict, resume from a Trainer checkpoint, and a run that raises."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import ledger  # noqa: E402
from ledger import Kind, load_public_key  # noqa: E402
from ledger.errors import ConfigurationError  # noqa: E402
from ledger.hooks import FingerprintOptions  # noqa: E402
from ledger.hooks.transformers import CURSOR_FILE, LedgerTrainerCallback  # noqa: E402
from ledger.torch import batch_digest  # noqa: E402
from ledger.verify import verify_ledger  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCH, ACCUMULATION, TOKENS = 2, 4, 16


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Synthetic token rows (the same every time); item ``fail_at`` raises, as bad data would."""

    def __init__(self, n: int = 64, fail_at: int | None = None) -> None:
        self.x = torch.randint(0, 64, (n, TOKENS), generator=torch.Generator().manual_seed(0))
        self.fail_at = fail_at

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i == self.fail_at:
            raise ValueError(f"corrupt record {i}")
        return {"input_ids": self.x[i], "labels": self.x[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=TOKENS, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    # transformers 5.24 finds no loss_type in the name GPT2LMHeadModel, so the Trainer counts
    # num_items_in_batch over unshifted labels (T, not T-1, per row) and trains on the token mean x (T-1)/T
    model.loss_type = "ForCausalLM"
    return model


def trainer(out: Path, callbacks: list[TrainerCallback], *, model: GPT2LMHeadModel | None = None,
            data: Tokens | None = None, evaluate: Tokens | None = None, **overrides: object) -> Trainer:
    settings: dict[str, object] = dict(
        output_dir=str(out / "hf"), report_to=[], use_cpu=True, disable_tqdm=True, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION, max_steps=6, logging_steps=1, save_strategy="steps", save_steps=3,
        learning_rate=1e-3, max_grad_norm=0.5, train_sampling_strategy="sequential", seed=7)
    settings.update(overrides)
    return Trainer(model=model or tiny_gpt2(), args=TrainingArguments(**settings),  # type: ignore[arg-type]
                   train_dataset=data or Tokens(), eval_dataset=evaluate, callbacks=callbacks)


def cli_verify(path: Path, public: Path, model: Path | None = None) -> tuple[int, dict]:
    command = [sys.executable, "-m", "ledger", "verify", str(path), "--key", str(public), "--json"]
    if model is not None:
        command += ["--model", str(model)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return done.returncode, json.loads(done.stdout)


def entries_of(path: Path) -> list[tuple[str, int]]:
    """(kind, step) of each entry; the Trainer checkpoint manifests (layout "files") as "trainer-files"."""
    return [("trainer-files" if e.body().get("layout") == "files" else e.kind.label, e.step)
            for e in ledger.open(path).entries()]


def statuses(report: dict) -> dict[str, str]:
    return {name: check["status"] for name, check in report["checks"].items()}


def steps_of(path: Path) -> list[dict]:
    return [e.body() | {"step": e.step} for e in ledger.open(path).entries() if e.kind is Kind.STEP]


class Forwards(TrainerCallback):  # type: ignore[misc]
    """Counts the training forwards (micro-batches) the model runs."""

    def __init__(self) -> None:
        self.count = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        model.register_forward_hook(lambda *_: setattr(self, "count", self.count + model.training))


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ledger.generate_keypair(tmp_path_factory.mktemp("keys") / "trainer")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path]) -> tuple[Path, Trainer, Forwards]:
    """Six optimizer steps of four micro-batches each, logged every step, Trainer checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("hf")
    forwards = Forwards()
    every = FingerprintOptions(batch="every", grad_norms="every")
    fit = trainer(out, [LedgerTrainerCallback(out / "L", key=keypair[0], config={"purpose": "test"},
                                              fingerprints=every), forwards])
    fit.train()
    return out, fit, forwards


def test_one_entry_per_optimizer_step_and_the_cli_verifies(run, keypair):
    out, fit, forwards = run
    assert forwards.count == 6 * ACCUMULATION and fit.state.global_step == 6
    assert entries_of(out / "L") == [
        ("genesis", -1), ("checkpoint", -1), ("step", 0), ("step", 1), ("step", 2), ("checkpoint", 2),
        ("trainer-files", 2), ("step", 3), ("step", 4), ("step", 5), ("checkpoint", 5), ("trainer-files", 5),
        ("seal", 5)]
    manifest = [e.body() for e in ledger.open(out / "L").entries() if e.body().get("layout") == "files"][0]
    assert Path(manifest["path"]) == out / "hf" / "checkpoint-3"
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(manifest["files"])
    code, report = cli_verify(out / "L", keypair[1], out / "hf" / "final_weights.safetensors")
    assert code == 0 and report["verdict"] == "pass"
    assert {k: v for k, v in statuses(report).items() if v != "skip"} == dict.fromkeys(
        ["chain", "signatures", "seal", "heads", "model", "checkpoints", "continuity"], "pass")


def test_genesis_records_the_framework_and_training_arguments(run):
    out, _, _ = run
    genesis = ledger.open(out / "L").genesis()
    framework = genesis["framework"]
    assert framework["name"] == "transformers" and framework["version"]
    assert framework["step_mapping"].startswith("ledger step s is Trainer state.global_step s+1")
    assert "after clipping" in framework["grad_norm"] and framework["gradient_accumulation_steps"] == ACCUMULATION
    arguments = genesis["config"]["training_arguments"]
    assert genesis["config"]["purpose"] == "test" and genesis["seed"] == 7
    assert arguments["gradient_accumulation_steps"] == ACCUMULATION and arguments["learning_rate"] == 1e-3
    assert not [k for k in arguments if k.endswith("_token")]
    assert genesis["optimizer"]["class"] == "torch.optim.adamw.AdamW"  # unwrapped from AcceleratedOptimizer


def test_logged_loss_is_the_true_step_loss_and_batch(run):
    """Ledger step 3 recomputed from the Trainer's checkpoint-3 (the weights after step 2) and the
    step's four micro-batches (a sequential sampler): the token-mean cross-entropy over the whole
    accumulated batch, and the digest of the inputs the model received."""
    out, fit, _ = run
    steps = steps_of(out / "L")
    model = GPT2LMHeadModel.from_pretrained(out / "hf" / "checkpoint-3")  # the weights, from HF's own files
    rows = Tokens().x[3 * BATCH * ACCUMULATION:4 * BATCH * ACCUMULATION]
    micro = [{"input_ids": rows[i:i + BATCH], "labels": rows[i:i + BATCH]} for i in range(0, len(rows), BATCH)]
    with torch.no_grad():
        total = sum(F.cross_entropy(model(input_ids=m["input_ids"]).logits[:, :-1].flatten(0, 1),
                                    m["labels"][:, 1:].flatten(), reduction="sum") for m in micro)
    expected = float(total) / (len(rows) * (TOKENS - 1))
    assert steps[3]["metrics"]["loss"] == pytest.approx(expected, rel=2e-6)
    assert steps[3]["batch_digest"] == batch_digest(micro)
    # logging every step, the Trainer's logged loss is this same float32 sum; its grad_norm is before
    # clipping (recorded as hf_grad_norm) and ours after: clipped to max_grad_norm = 0.5
    logged = [h for h in fit.state.log_history if "loss" in h]
    assert [s["metrics"]["loss"] for s in steps] == [h["loss"] for h in logged]
    assert [s["metrics"]["hf_grad_norm"] for s in steps] == [h["grad_norm"] for h in logged]
    assert all(s["metrics"]["hf_grad_norm"] > 0.5 and s["metrics"]["grad_norm"] == pytest.approx(0.5, rel=1e-5)
               for s in steps)


def test_the_trainer_logs_window_means_where_a_naive_callback_sees_running_sums(tmp_path, keypair):
    """logging_steps=3: HF logs the mean over three steps; its running tr_loss, which a naive callback
    reads at on_step_end, is the sum so far. The ledger has each step's own loss."""
    fit = trainer(tmp_path, [LedgerTrainerCallback(tmp_path / "L", key=keypair[0])], logging_steps=3,
                  gradient_accumulation_steps=1, save_strategy="no")
    fit.train()
    losses = [s["metrics"]["loss"] for s in steps_of(tmp_path / "L")]
    logged = [h["loss"] for h in fit.state.log_history if "loss" in h]
    assert logged == pytest.approx([sum(losses[:3]) / 3, sum(losses[3:]) / 3], rel=1e-6)
    naive = [sum(losses[:1]), sum(losses[:2]), sum(losses[:3])]  # what tr_loss holds after steps 1, 2, 3
    assert naive[1] == pytest.approx(2 * naive[0], rel=0.05) and losses[1] != pytest.approx(naive[1], rel=0.05)
    assert [s["metrics"].get("hf_grad_norm") is not None for s in steps_of(tmp_path / "L")] == [
        False, False, True, False, False, True]  # the Trainer's grad_norm only where it logged, at that step


class RaiseAt(TrainerCallback):  # type: ignore[misc]
    def __init__(self, global_step: int) -> None:
        self.global_step = global_step

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.global_step:
            raise RuntimeError("diverged")


def test_a_raising_run_leaves_a_valid_ledger_and_resume_continues_the_chain(run, tmp_path, keypair):
    with pytest.raises(RuntimeError, match="diverged"):
        trainer(tmp_path, [LedgerTrainerCallback(tmp_path / "L", key=keypair[0]), RaiseAt(5)], save_steps=2).train()
    code, report = cli_verify(tmp_path / "L", keypair[1])  # the crashed run's writer is still open in-process
    assert code == 0 and statuses(report)["seal"] == "warn"
    assert [s["step"] for s in steps_of(tmp_path / "L")] == [0, 1, 2, 3]  # step 4's entry waited for its log
    cursor = json.loads((tmp_path / "hf" / "checkpoint-4" / CURSOR_FILE).read_text())
    assert cursor["global_step"] == 4 and cursor["cursor"]["checkpoint"]["step"] == 3
    assert "manifest" in cursor and "files" not in cursor  # the ledger's signed manifest pins the files

    # a new Trainer (fresh model) resumes from its last checkpoint, checkpoint-4: the callback takes the
    # ledger over from the crashed run's (still open in this process) and continues the chain
    fit = trainer(tmp_path, [LedgerTrainerCallback(tmp_path / "L", key=keypair[0])], save_steps=2)
    fit.train(resume_from_checkpoint=True)
    assert entries_of(tmp_path / "L")[-8:] == [("checkpoint", 3), ("trainer-files", 3), ("resume", 3), ("step", 4),
                                               ("step", 5), ("checkpoint", 5), ("trainer-files", 5), ("seal", 5)]
    code, report = cli_verify(tmp_path / "L", keypair[1], tmp_path / "hf" / "final_weights.safetensors")
    assert code == 0 and statuses(report)["continuity"] == "pass" and statuses(report)["seal"] == "pass"
    # the resumed steps are the uninterrupted run's steps, bit for bit (no dropout, sequential data)
    resumed = [s["metrics"]["loss"] for s in steps_of(tmp_path / "L")][-2:]
    assert resumed == [s["metrics"]["loss"] for s in steps_of(run[0] / "L")][4:]


def test_resume_refuses_a_checkpoint_changed_since_it_was_recorded(tmp_path, keypair):
    with pytest.raises(RuntimeError):
        trainer(tmp_path, [LedgerTrainerCallback(tmp_path / "L", key=keypair[0]), RaiseAt(5)], save_steps=2).train()
    weights = tmp_path / "hf" / "checkpoint-4" / "model.safetensors"
    tensors = load_file(weights)
    tensors["transformer.ln_f.bias"][0] += 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})  # still loads: the Trainer resumes from it
    report = verify_ledger(tmp_path / "L", key=load_public_key(keypair[1]))  # the signed manifest catches it too
    assert report.check("checkpoints").status == "fail" and "model.safetensors" in report.check("checkpoints").detail
    fit = trainer(tmp_path, [LedgerTrainerCallback(tmp_path / "L", key=keypair[0])], save_steps=2)
    with pytest.raises(ConfigurationError, match="changed since the ledger recorded it .model.safetensors"):
        fit.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-4"))


def test_data_that_raises_leaves_a_valid_unsealed_ledger(tmp_path, keypair):
    """Record 12 is bad: the Trainer fetches step 1's four micro-batches (records 8-15) and raises.
    The ledger is valid at once (the background writer may still hold step 0) and after the abort
    the exit handler runs, unsealed with step 0."""
    callback = LedgerTrainerCallback(tmp_path / "L", key=keypair[0])
    with pytest.raises(ValueError, match="corrupt record 12"):
        trainer(tmp_path, [callback], data=Tokens(fail_at=12), logging_steps=2).train()
    public = load_public_key(keypair[1])
    report = verify_ledger(tmp_path / "L", key=public)
    assert report.verdict == "pass" and report.check("seal").status == "warn"
    callback.abort()  # what the exit handler does
    report = verify_ledger(tmp_path / "L", key=public)
    assert report.verdict == "pass" and report.check("seal").status == "warn"
    assert [s["step"] for s in steps_of(tmp_path / "L")] == [0]


DDP_WORKER = """
import sys
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from test_transformers import trainer
from ledger.hooks.transformers import LedgerTrainerCallback
out = Path(sys.argv[1])
trainer(out, [LedgerTrainerCallback(out / "L", key=Path(sys.argv[2]))], ddp_backend="gloo",
        gradient_accumulation_steps=2, max_steps=4, save_steps=2).train()
import torch.distributed as dist
if dist.is_initialized():  # gloo's threads left to interpreter exit may abort it ("terminate called ...")
    dist.barrier()
    dist.destroy_process_group()
sys.stdout.flush()
import os
os._exit(0)  # everything is closed: skip interpreter teardown, where gloo's threads abort at random
"""


@pytest.mark.slow
def test_two_processes_write_one_ledger_that_verifies(tmp_path, keypair):
    """The Trainer under torch.distributed (gloo, two CPU processes, as torchrun starts them): the
    callback builds a recorder on both; rank 0 writes the one ledger, both ranks' weights are compared
    at each checkpoint, and only rank 0 writes the cursor file."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path), str(keypair[0]),
                               str(ROOT / "tests")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
             for rank in (0, 1)]
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)[-4000:]
    book = ledger.open(tmp_path / "L")
    assert book.genesis()["distributed"]["world_size"] == 2 and book.sealed
    checkpoints = [e.body() for e in book.entries() if e.kind is Kind.CHECKPOINT and "layout" not in e.body()]
    assert [len(c["ranks"]) for c in checkpoints] == [2, 2, 2]  # init, after steps 1 and 3
    assert len(steps_of(tmp_path / "L")) == 4
    cursor = json.loads((tmp_path / "hf" / "checkpoint-2" / CURSOR_FILE).read_text())
    assert cursor["cursor"]["checkpoint"]["step"] == 1
    manifests = [e.body() for e in book.entries() if e.body().get("layout") == "files"]  # rank 0 records them
    assert {"model.safetensors", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth", CURSOR_FILE} \
        <= set(manifests[0]["files"])
    report = verify_ledger(tmp_path / "L", key=load_public_key(keypair[1]),
                           model=tmp_path / "hf" / "final_weights.safetensors")
    assert report.verdict == "pass" and report.check("checkpoints").status == "pass"
    assert report.check("continuity").status == "pass"


def test_bad_arguments_are_refused_with_one_clear_error(tmp_path, keypair):
    assert LedgerTrainerCallback(tmp_path / "L", key=keypair[0], mlflow=True).options["mlflow"] is True
    with pytest.raises(ConfigurationError, match="sets Recorder.s model itself"):
        LedgerTrainerCallback(tmp_path / "L", key=keypair[0], model=torch.nn.Linear(1, 1))
    with pytest.raises(ConfigurationError, match="unknown option 'keep_last'"):
        LedgerTrainerCallback(tmp_path / "L", key=keypair[0], keep_last=2)
    fit = trainer(tmp_path, [LedgerTrainerCallback(tmp_path / "L", key=keypair[0])], load_best_model_at_end=True,
                  eval_strategy="steps", eval_steps=3, evaluate=Tokens(8))
    with pytest.raises(ConfigurationError, match="load_best_model_at_end"):
        fit.train()
    assert not (tmp_path / "L").exists()


def test_a_loss_computed_outside_the_model_is_absent_with_a_warning(tmp_path, keypair):
    fit = trainer(tmp_path, [LedgerTrainerCallback(tmp_path / "L", key=keypair[0],
                                                   fingerprints=FingerprintOptions(batch="every"))],
                  label_smoothing_factor=0.1,
                  max_steps=2, save_strategy="no")
    with pytest.warns(RuntimeWarning, match="the model returned no loss"):
        fit.train()
    steps = steps_of(tmp_path / "L")
    assert len(steps) == 2 and all("loss" not in s["metrics"] and s["batch_digest"] for s in steps)


@pytest.mark.slow
def test_a_process_that_dies_of_an_exception_leaves_its_ledger_closed_and_unsealed(tmp_path):
    """The example as a user runs it, stopped by an exception after optimizer step 6: the callback's
    exit handler closes the ledger (no log tail left), unsealed, with steps 0-6. (The example's plain
    run is in test_examples.py; resuming is tested in-process above.)"""
    example = [sys.executable, str(ROOT / "examples" / "hf_trainer.py"), "--out", str(tmp_path / "out"),
               "--steps", "8", "--crash-at", "6"]
    crashed = subprocess.run(example, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == 1 and "stopped after optimizer step 6" in crashed.stderr
    book = ledger.open(tmp_path / "out" / "ledger")
    assert not book.sealed and not book.wal_tail()  # aborted at exit: the log was closed, not just left
    report = verify_ledger(tmp_path / "out" / "ledger", key=load_public_key(tmp_path / "out" / "keys" / "trainer.pub"))
    assert report.verdict == "pass" and report.check("seal").status == "warn"
    assert [s["step"] for s in steps_of(tmp_path / "out" / "ledger")] == list(range(7))


class LinkIntoCheckpoint(TrainerCallback):  # type: ignore[misc]
    """Another callback that links a shared file into each checkpoint-N (before the ledger's runs)."""

    def on_save(self, args, state, control, **kwargs):  # noqa: D102
        target = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "shared_vocab.json"
        target.symlink_to(Path(args.output_dir).parent / "vocab.json")


def test_a_checkpoint_that_cannot_be_recorded_warns_and_training_goes_on(tmp_path, keypair):
    (tmp_path / "vocab.json").write_text("{}")
    callbacks = [LinkIntoCheckpoint(), LedgerTrainerCallback(tmp_path / "L", key=keypair[0])]
    with pytest.warns(RuntimeWarning, match="checkpoint-3 was not recorded .*symlink"):
        trainer(tmp_path, callbacks).train()
    assert ledger.open(tmp_path / "L").sealed
    assert not [e for e in ledger.open(tmp_path / "L").entries() if e.body().get("layout") == "files"]


CURSOR_V1 = '{"format": "training-ledger/hf-trainer-cursor/v1", "cursor": {"checkpoint": "x"}}'


@pytest.mark.parametrize("content", [CURSOR_V1, "[1]", "[" * 100_000, "x" * (2 << 20)])
def test_a_malformed_cursor_file_is_one_clear_error(tmp_path, keypair, content):
    """The cursor file is read only once the signed manifest vouches for it; crafted content (wrong
    types, deep nesting, megabytes) is one ConfigurationError, never a traceback."""
    from ledger.hooks._trainer_cursor import read_cursor

    with pytest.raises(RuntimeError):
        trainer(tmp_path, [LedgerTrainerCallback(tmp_path / "L", key=keypair[0]), RaiseAt(4)], save_steps=3).train()
    directory = tmp_path / "hf" / "checkpoint-3"
    with pytest.raises(ConfigurationError, match="changed since the ledger recorded it"):  # not parsed before
        (directory / CURSOR_FILE).write_text(content)
        read_cursor(directory, 3, tmp_path / "L")
