"""Coverage-guided fuzzing of the format readers (atheris), and a replay of every kept input.

The fuzz run (slow) gives each target — the record decoder, the write-ahead-log frame reader, the
safetensors header reader, the signed-tree-head (note) reader and the proof-file reader and checker
(tests/fuzz_targets.py) — 20 s under libFuzzer with a 2 GiB RSS limit (above what the process inherits); a
crash (any exception but FormatError, a timeout, an RSS blow-up) fails the test and names the input,
which is then kept in tests/fuzz_corpus/<target>/ so the fast replay below guards it for ever.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_targets import TARGETS, run_one

CORPUS = Path(__file__).parent / "fuzz_corpus"
INPUTS = sorted((t, p) for t in TARGETS for p in (CORPUS / t).iterdir() if p.is_file())


@pytest.mark.parametrize("target, path", INPUTS, ids=[f"{t}/{p.name}" for t, p in INPUTS])
def test_kept_fuzz_inputs_raise_only_format_errors(target, path):
    run_one(target, path.read_bytes())


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz(target, tmp_path):
    pytest.importorskip("atheris")
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    shutil.copytree(CORPUS / target, corpus)
    artifacts.mkdir()
    # libFuzzer reads its peak RSS from getrusage, and a process started from this one inherits this
    # one's peak as its own (Linux keeps ru_maxrss across fork and exec): after a memory-heavy test in
    # this worker, a 2 GiB limit would fail every target at once. The limit is 2 GiB above that floor,
    # and the target itself may map at most 2 GiB more than at its start (fuzz_targets.cap_memory).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    inherited_mb = peak >> 20 if sys.platform == "darwin" else peak >> 10
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "fuzz_targets.py"), target, "-max_total_time=20",
         f"-rss_limit_mb={2048 + inherited_mb}", "-timeout=10", f"-artifact_prefix={artifacts}/", str(corpus)],
        capture_output=True, text=True, timeout=120)
    found = sorted(artifacts.iterdir())
    assert done.returncode == 0 and not found, (
        f"atheris found {[p.name for p in found]} (keep each in tests/fuzz_corpus/{target}/):\n{done.stderr[-3000:]}")
