"""A tiny GPT-2 trained with the Hugging Face Trainer, recorded by adding one callback.

``python examples/hf_trainer.py --out hf-out`` trains on synthetic tokens (CPU, seconds), seals the
ledger and verifies it with the CLI. ``--crash-at N`` stops the run with an exception after
optimizer step N (the ledger stays valid, unsealed); running again with ``--resume`` continues from
the Trainer's last checkpoint and the same ledger chain. The lines marked ``# ledger`` are all the
Trainer needs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from _outdir import fresh_output  # examples/_outdir.py (the script's folder is on sys.path)
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import ledger
from ledger.hooks.transformers import LedgerTrainerCallback


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Synthetic token rows: a noisy repeating pattern a small model can learn."""

    def __init__(self, rows: int = 256, length: int = 32, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        base = torch.arange(length) % 8
        self.x = (base + torch.randint(0, 8, (rows, 1), generator=g) * 8) % vocab

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


class CrashAt(TrainerCallback):  # type: ignore[misc]
    """Raises after optimizer step ``n`` (Trainer global_step n+1), as a diverging run might."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.n + 1:
            raise RuntimeError(f"stopped after optimizer step {self.n} (--crash-at)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("hf-out"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--crash-at", type=int, default=None, help="raise after this optimizer step")
    parser.add_argument("--resume", action="store_true", help="continue from the last Trainer checkpoint in --out")
    args = parser.parse_args()
    if args.resume:
        if not (args.out / "keys" / "trainer.pem").is_file():
            sys.exit(f"{args.out} holds no earlier run to resume")
        private_key, public_key = args.out / "keys" / "trainer.pem", args.out / "keys" / "trainer.pub"
    else:
        fresh_output(args.out)
        private_key, public_key = ledger.generate_keypair(args.out / "keys" / "trainer")

    torch.manual_seed(1)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # so the Trainer normalises the loss over the shifted labels
    training = TrainingArguments(output_dir=str(args.out / "hf"), max_steps=args.steps, per_device_train_batch_size=8,
                                 gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=5, save_steps=5,
                                 report_to=[], use_cpu=True, disable_tqdm=True, seed=1)
    callbacks: list[TrainerCallback] = [
        LedgerTrainerCallback(args.out / "ledger", key=private_key,  # ledger
                              final_weights=args.out / "model.safetensors")]
    if args.crash_at is not None:
        callbacks.append(CrashAt(args.crash_at))
    trainer = Trainer(model=model, args=training, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=get_last_checkpoint(str(args.out / "hf")) if args.resume else None)

    command = [sys.executable, "-m", "ledger", "verify", str(args.out / "ledger"), "--key", str(public_key),
               "--model", str(args.out / "model.safetensors")]
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
