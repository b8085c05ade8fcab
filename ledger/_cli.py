"""The ``ledger`` command: parse, call the library, render, map errors to exit codes.

Exit codes: 0 pass, 1 verification failed (a damaged ledger included), 2 could not run (bad
input, usage), 3 internal error. Errors are one line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
import traceback
from collections.abc import Mapping
from typing import Any

import click

from ledger import Ledger, generate_keypair
from ledger._text import printable
from ledger.errors import ConfigurationError, LedgerError

EXIT_PASS, EXIT_FAIL, EXIT_CANNOT_RUN, EXIT_INTERNAL = 0, 1, 2, 3
METRIC_COLUMNS = 256  # `ledger log` and `ledger info` show at most this many distinct metric names



# commands defined in other modules: (module, function), imported only when the command is named, so
# that starting any other command does not pay for their imports
_ELSEWHERE = {"publish": ("ledger._cli_publish", "publish"), "prove": ("ledger._cli_proofs", "prove"),
              "verify-proof": ("ledger._cli_proofs", "verify_proof"),
              "consistency": ("ledger._cli_proofs", "consistency")}


class _Commands(click.Group):
    """The command group; errors raised by a command become one line and their exit code here,
    where click's context knows whether ``--debug`` was given."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_ELSEWHERE})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in _ELSEWHERE:
            import importlib

            module, name = _ELSEWHERE[cmd_name]
            command = getattr(importlib.import_module(module), name)
            assert isinstance(command, click.Command)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except LedgerError as exc:
            if ctx.params.get("debug"):
                traceback.print_exc()
            click.echo(f"ledger: error: {printable(exc)}", err=True)
            ctx.exit(exc.exit_code)
        except Exception as exc:  # a bug of ours
            if ctx.params.get("debug"):
                traceback.print_exc()
            click.echo(f"ledger: internal error: {type(exc).__name__}: {printable(exc)} (run with --debug for the "
                       "traceback)", err=True)
            ctx.exit(EXIT_INTERNAL)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="training-ledger")
def cli(debug: bool) -> None:
    """Record and verify signed training ledgers."""


@cli.command()
@click.argument("prefix", type=click.Path(dir_okay=False))
@click.option("--encrypt", is_flag=True, help="Encrypt the private key with a passphrase (prompted).")
@click.option("--passphrase-env", metavar="VAR", help="Read the passphrase from environment variable VAR.")
@click.option("--type", "key_type", type=click.Choice(["ed25519", "p256"]), default="ed25519", show_default=True,
              help="ed25519: a trainer's key. p256: an ECDSA P-256 release key for `ledger publish` (OpenSSF Model "
                   "Signing accepts only ECDSA keys).")
def keygen(prefix: str, encrypt: bool, passphrase_env: str | None, key_type: str) -> None:
    """Write a key pair: PREFIX.pem (private, PKCS#8, mode 0600) and PREFIX.pub (public)."""
    passphrase = None
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if not value:
            raise click.UsageError(f"environment variable {passphrase_env} is empty or not set")
        passphrase = value.encode()
    elif encrypt:
        if not sys.stdin.isatty():
            raise ConfigurationError("--encrypt asks for the passphrase on a terminal and there is none; give it "
                                     "with --passphrase-env VAR (e.g. --passphrase-env LEDGER_KEY_PASSPHRASE)")
        passphrase = click.prompt("Passphrase", hide_input=True, confirmation_prompt=True).encode()
    private_path, public_path = generate_keypair(prefix, passphrase, key_type)
    click.echo(f"private key: {printable(private_path)} (keep it secret)")
    click.echo(f"public key:  {printable(public_path)} (publish it with your ledgers)")


def _iso(ns: object) -> str | None:
    """An ISO time from nanoseconds since the epoch; None for anything else (a signed genesis can
    hold any CBOR value in ``created_ns``)."""
    if isinstance(ns, bool) or not isinstance(ns, (int, float)) or not math.isfinite(ns):
        return None
    try:
        return _dt.datetime.fromtimestamp(ns / 1e9, tz=_dt.timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):
        return None


def _fact(value: object) -> object:
    """A genesis value as shown by ``info``: a string or a finite number as it is, anything else
    (bytes, a map, …) as its repr, shortened."""
    if value is None or isinstance(value, (str, bool)) or (isinstance(value, int) and abs(value) < 1 << 63):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _metric_names(table: Any) -> tuple[list[str], int]:
    """The distinct metric names of the entries (those ``log`` shows as columns: at most
    METRIC_COLUMNS, the most often logged, in order of first appearance) and how many more there
    are; counted from the flattened maps, without building a frame."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = []
    for chunk in table["metrics"].chunks:
        entries = chunk.cast(pa.list_(pa.struct([chunk.type.key_field, chunk.type.item_field])))
        keys.append(entries.flatten().field(0))
    if not keys:
        return [], 0
    counted = pc.value_counts(pa.concat_arrays(keys))  # in order of first appearance
    names = counted.field("values").to_pylist()
    counts = counted.field("counts").to_pylist()
    named = [(i, n, c) for i, (n, c) in enumerate(zip(names, counts, strict=True))
             if n not in ("seq", "kind", "step", "time", "hash")]
    kept = sorted(sorted(named, key=lambda t: -t[2])[:METRIC_COLUMNS])
    return [n for _, n, _ in kept], len(named) - len(kept)


def ledger_info(path: str) -> dict[str, Any]:
    """Facts about a ledger, without verifying it. Genesis values of an unexpected type are shown
    as their repr (or None for a time): ``info`` reads what any ledger holds."""
    import pyarrow.compute as pc

    ledger = Ledger(path)
    genesis_entry, last = ledger.genesis_entry(), ledger.last_entry()
    body = genesis_entry.body()
    genesis: Mapping[Any, Any] = body if isinstance(body, Mapping) else {}
    table = ledger.table()
    kinds = pc.value_counts(table["kind"])
    is_step = pc.equal(table["kind"], "step")
    steps = pc.min_max(pc.filter(table["step"], is_step)) if pc.any(is_step).as_py() else None
    metrics, omitted = _metric_names(table)
    key_id = genesis.get("key_id")
    facts = {
        "path": str(ledger.path),
        "run_id": _fact(genesis.get("run_id")),
        "format": _fact(genesis.get("format")),
        "created": _iso(genesis.get("created_ns")),
        "key_id": key_id.hex() if isinstance(key_id, bytes) else None,
        "entries": table.num_rows,
        "kinds": dict(sorted((str(k), int(v)) for k, v in zip(kinds.field("values").to_pylist(),
                                                               kinds.field("counts").to_pylist(), strict=True))),
        "steps": [int(steps["min"].as_py()), int(steps["max"].as_py())] if steps is not None else None,
        "sealed": last.kind.label == "seal",
        "head": last.hash.hex(),
        "last_time": _iso(last.time_ns),
        "parts": sum(1 for s in ledger.sources() if s.name.startswith("parts/")),
        "log_tail_entries": len(ledger.wal_tail()),
        "torn_tail_bytes": len(ledger.wal_torn),
        "metrics": metrics,
        "genesis_fields": sorted(k if isinstance(k, str) else repr(k) for k in genesis),
    }
    for field in ("framework", "distributed"):  # the trainer's claims about how the run was driven
        value = genesis.get(field)
        if isinstance(value, Mapping):
            facts[field] = {str(k): _fact(v) for k, v in value.items()}
    if omitted:
        facts["metrics_omitted"] = omitted
    return facts


@cli.command()
@click.argument("ledger_path", metavar="LEDGER")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(ledger_path: str, as_json: bool) -> None:
    """Show what a ledger holds (no verification). At most 256 metric names are listed (the most
    often logged); ``metrics_omitted`` counts the rest."""
    facts = ledger_info(ledger_path)
    if facts.get("metrics_omitted"):
        click.echo(f"ledger: note: {facts['metrics_omitted']} more metric names not listed (at most "
                   f"{METRIC_COLUMNS}, the most often logged)", err=True)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        if isinstance(value, (list, dict)):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else \
                ", ".join(map(str, value))
        click.echo(f"{key:>17}: {printable(value)}")


@cli.command()
@click.argument("ledger_path", metavar="LEDGER")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--kind", help="Only entries of this kind (step, checkpoint, …).")
@click.option("--tail", type=click.IntRange(min=1), help="Only the last N entries.")
def log(ledger_path: str, fmt: str, kind: str | None, tail: int | None) -> None:
    """Print the entries, one row each, metrics as columns: at most 256 metric columns (the most
    often logged names, in order of first appearance); a note on stderr says how many were left out."""
    frame = Ledger(ledger_path).to_pandas(max_metrics=METRIC_COLUMNS)
    omitted = frame.attrs.get("metrics_omitted")
    if omitted:
        click.echo(f"ledger: note: {omitted} more metric names not shown (at most {METRIC_COLUMNS} metric "
                   "columns, the most often logged)", err=True)
    if kind:
        frame = frame[frame["kind"] == kind]
    if tail:
        frame = frame.tail(tail)
    if fmt == "csv":
        click.echo(frame.to_csv(index=False), nl=False)
    elif fmt == "json":
        out = frame.assign(time=frame["time"].map(lambda t: t.isoformat()))
        click.echo(out.to_json(orient="records", indent=1))
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", None, "display.width", 200):
            click.echo(frame.drop(columns=["hash"]).to_string(index=False))


class _Progress:
    """Progress on stderr, only when stderr is a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.enabled:
            end = "\n" if done >= total else ""
            unit = {"replay": "intervals", "lineage": "matrices"}.get(stage, "entries")
            sys.stderr.write(f"\r{stage}: {done}/{total} {unit}{end}")
            sys.stderr.flush()


_STATUS_COLOURS = {"pass": "green", "fail": "red", "warn": "yellow", "skip": "bright_black"}


@cli.command()
@click.argument("ledger_path", metavar="LEDGER", required=False)
@click.option("--mlflow-run", "mlflow_run", metavar="RUN_ID", help="Verify the ledger this MLflow run published "
              "(its ledger/ artifacts, downloaded to a temporary directory) instead of LEDGER, and compare the "
              "run's metrics, params and tags with it (check mlflow).")
@click.option("--tracking-uri", "tracking_uri", metavar="URI", help="The MLflow tracking server of --mlflow-run "
              "(default: MLflow's configured one, MLFLOW_TRACKING_URI).")
@click.option("--live", is_flag=True, help="With --mlflow-run: the run is still going, so its published ledger "
              "is not sealed yet; without --live an unsealed one fails check mlflow (it may have been cut short).")
@click.option("--key", type=click.Path(), help="The trainer's public key (PEM). Without it signatures "
              "are only self-consistent (required with --mlflow-run).")
@click.option("--model", type=click.Path(), help="The released weights (safetensors, or a sharded *.index.json) "
              "to compare with the sealed final weights.")
@click.option("--checkpoints", "checkpoint_dir", type=click.Path(), help="Directory holding the run's checkpoints "
              "(named by state digest) when they are not inside the ledger.")
@click.option("--recipe", metavar="FILE.py:NAME", help="The training recipe: enables init regeneration and replay. "
              "Only this file is imported.")
@click.option("--replay", "replay", type=click.IntRange(min=0), default=2, show_default=True,
              help="Random intervals to replay, besides every continuity anomaly and the largest update.")
@click.option("--replay-seed", type=int, help="Reproduce an earlier replay draw (the report prints the seed).")
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), help="Compare replays with the relative "
              "rule ‖W′−W‖ ≤ ρ·‖W−W_t‖ at this ρ instead of bit-exactly.")
@click.option("--against", "against", multiple=True, type=click.Path(), metavar="FOREIGN.safetensors",
              help="Foreign weights to test lineage against (repeatable).")
@click.option("--base", "base", type=click.Path(), metavar="FILE", help="The weights (safetensors, or a sharded "
              "*.index.json) of the base model a fine-tuning run declares in genesis: init checks that the run "
              "starts from exactly them.")
@click.option("--sample", type=click.IntRange(min=0), help="Quick look: check the head and N random entries' "
              "signatures and bodies only.")
@click.option("--sample-seed", type=int, help="Reproduce an earlier --sample draw.")
@click.option("--require", "require", default="", metavar="CHECK,…", help="Checks that must pass; a warning or "
              "skip of one of them fails the verdict.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object to stdout.")
@click.option("--workers", type=click.IntRange(min=1), help="Processes for signature checks (default: all cores).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), metavar="FILE.html",
              help="Also write a one-file HTML report (checks, ledger facts, plots) to FILE.html.")
@click.option("--tsa-roots", "tsa_roots", type=click.Path(), metavar="PEM", help="Root certificates of the "
              "time-stamping authorities to trust (PEM): check timestamps verifies the ledger's RFC 3161 tokens "
              "and reports when its entries provably existed.")
@click.option("--release-key", "release_key", type=click.Path(), metavar="PUB", help="A release bundle's public "
              "release key (PEM, P-256 or Ed25519): the attestations and model.sig must be signed by it.")
@click.option("--policy", type=click.Path(), metavar="FILE.toml", help="A release bundle's trust policy: accepted "
              "keys or key ids, the origin, the minimum number of signatures (docs/PUBLISHING.md).")
def verify(ledger_path: str | None, mlflow_run: str | None, tracking_uri: str | None, live: bool, key: str | None,
           model: str | None, checkpoint_dir: str | None, recipe: str | None,
           replay: int, replay_seed: int | None, tolerance: float | None, against: tuple[str, ...], sample: int | None,
           sample_seed: int | None, require: str, as_json: bool, workers: int | None,
           report_path: str | None, base: str | None, tsa_roots: str | None, release_key: str | None,
           policy: str | None) -> None:
    """Verify a ledger, a release bundle written by `ledger publish`, or the ledger an MLflow run
    published; exit 0 when no check failed, 1 when one did."""
    import importlib.util

    from ledger.verify import render_json, render_text, verify_ledger, verify_mlflow_run

    if (ledger_path is None) == (mlflow_run is None):
        raise ConfigurationError("give either LEDGER or --mlflow-run RUN_ID")
    if (tracking_uri or live) and not mlflow_run:
        raise ConfigurationError(f"{'--tracking-uri' if tracking_uri else '--live'} needs --mlflow-run")
    if mlflow_run and not key:  # whoever can edit the run can replace its ledger and its key.pub
        raise ConfigurationError("--mlflow-run needs --key (the trainer's public key): the run's own "
                                 "ledger/key.pub is not evidence")
    if mlflow_run and importlib.util.find_spec("mlflow") is None:
        raise ConfigurationError("--mlflow-run needs mlflow, which is not installed: "
                                 "pip install 'training-ledger[mlflow]'")

    if report_path and importlib.util.find_spec("matplotlib") is None:
        raise ConfigurationError("--report needs matplotlib, which is not installed: "
                                 "pip install 'training-ledger[report]'")
    if report_path:
        recipe_file = recipe.rpartition(":")[0] or recipe if recipe else None
        # a ledger downloaded from MLflow lies in a fresh temporary directory: no report can be inside it
        _refuse_report_inside(report_path, ledger_path, checkpoint_dir or (
            _recorded_checkpoint_dir(ledger_path) if ledger_path else None),
                              [p for p in (key, model, base, recipe_file, tsa_roots, *against) if p])
    names = [n.strip() for n in require.split(",") if n.strip()]
    options: dict[str, Any] = dict(key=key, model=model, sample=sample, sample_seed=sample_seed, require=names,
                                   workers=workers, progress=_Progress(), checkpoints=checkpoint_dir, recipe=recipe,
                                   replay=replay, replay_seed=replay_seed, tolerance=tolerance, against=against,
                                   base=base, tsa_roots=tsa_roots)
    from ledger.verify._bundle import is_bundle, verify_bundle

    bundle = ledger_path is not None and is_bundle(ledger_path)
    if (release_key or policy) and not bundle:
        raise ConfigurationError("--release-key and --policy apply to a release bundle (a directory written by "
                                 "`ledger publish`)")
    if mlflow_run is not None:
        report = verify_mlflow_run(mlflow_run, tracking_uri, live=live, **options)
    elif bundle:
        assert ledger_path is not None
        report = verify_bundle(ledger_path, release_key=release_key, policy=policy, **options)
    else:
        assert ledger_path is not None
        report = verify_ledger(ledger_path, **options)
    if as_json:
        click.echo(render_json(report))
    else:
        click.echo(printable(render_text(report, lambda text, status: click.style(
            text, fg=_STATUS_COLOURS[status], bold=True)), controls=False))
    if report_path:
        _write_report(report, report_path)
    sys.exit(EXIT_PASS if report.verdict == "pass" else EXIT_FAIL)


def _recorded_checkpoint_dir(ledger_path: str) -> str | None:
    """The ``checkpoint_dir`` a genesis names (where verify reads checkpoints without
    ``--checkpoints``), or None; a ledger that cannot be read is verify's to report."""
    import os.path

    try:
        value = Ledger(ledger_path).genesis().get("checkpoint_dir")
    except (LedgerError, OSError):
        return None
    if not isinstance(value, str) or not value:
        return None
    return value if os.path.isabs(value) else os.path.join(ledger_path, value)


def _refuse_report_inside(report_path: str, ledger_path: str | None, checkpoint_dir: str | None,
                          inputs: list[str]) -> None:
    """Refuse (exit 2) a report path inside the ledger directory or the checkpoint root, or naming
    an input file: verify writes nothing but the report, and never over its evidence."""
    from pathlib import Path

    try:
        target = Path(report_path).resolve()
        roots = [(Path(ledger_path).resolve(), "inside the ledger directory")] if ledger_path else []
        if checkpoint_dir:
            roots.append((Path(checkpoint_dir).resolve(), "inside the checkpoint directory"))
        resolved_inputs = [(path, Path(path).resolve()) for path in inputs]
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise ConfigurationError(f"cannot resolve the --report path {report_path}: {exc}") from exc
    for root, where in roots:
        if target == root or root in target.parents:
            raise ConfigurationError(f"--report {report_path} is {where} {root}: write the report elsewhere")
    for path, resolved in resolved_inputs:
        if resolved == target:
            raise ConfigurationError(f"--report {report_path} is the input file {path}: write the report elsewhere")


def _render_html_isolated(report: Any) -> str:
    """Render the HTML report with matplotlib's config and cache directory (MPLCONFIGDIR) in a
    temporary directory removed afterwards: verify writes nothing but the report, not even a font
    cache under ~/.cache or ~/.config."""
    import shutil
    import tempfile

    from ledger.verify import render_html

    if "matplotlib" in sys.modules:  # already configured by whoever imported it
        return render_html(report)
    scratch = tempfile.mkdtemp(prefix="ledger-mpl-")
    before = os.environ.get("MPLCONFIGDIR")
    os.environ["MPLCONFIGDIR"] = scratch
    try:
        return render_html(report)
    finally:
        if before is None:
            os.environ.pop("MPLCONFIGDIR", None)
        else:
            os.environ["MPLCONFIGDIR"] = before
        shutil.rmtree(scratch, ignore_errors=True)


def _write_report(report: Any, report_path: str) -> None:
    """Render the HTML report and write it (parent directories created) through a temporary file
    beside it, renamed into place (removed on failure); the note goes to stderr."""
    import tempfile
    from pathlib import Path

    data = _render_html_isolated(report).encode("utf-8", "backslashreplace")
    target = Path(report_path)
    temp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as handle:
            umask = os.umask(0o022)
            os.umask(umask)
            os.fchmod(handle.fileno(), 0o666 & ~umask)
            handle.write(data)
        os.replace(temp, target)
        temp = None
    except (OSError, UnicodeError) as exc:
        raise ConfigurationError(f"cannot write the report to {report_path}: {exc}") from exc
    finally:
        if temp is not None:
            try:
                os.unlink(temp)
            except OSError:
                pass
    click.echo(f"report written to {printable(report_path)}", err=True)


@cli.group(name="mlflow")
def mlflow_group() -> None:
    """The MLflow mirror of a ledger (needs the mlflow extra)."""


@mlflow_group.command(name="sync")
@click.argument("ledger_path", metavar="LEDGER", type=click.Path())
@click.option("--run-id", help="The MLflow run (default: the one genesis config['mlflow'] names).")
@click.option("--tracking-uri", help="The tracking server (default: the one genesis names).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), metavar="FILE.html",
              help="Also upload this verify report (ledger verify --report) as the run's ledger/report.html.")
def mlflow_sync(ledger_path: str, run_id: str | None, tracking_uri: str | None, report_path: str | None) -> None:
    """Push what the MLflow run lacks of LEDGER: entries after its ledger.mirrored_seq tag, parts not
    uploaded, the public key (and a verify report with --report). Idempotent: a second run logs
    nothing again."""
    import importlib.util

    Ledger(ledger_path)  # a missing or foreign directory: one line, exit 2
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigurationError("ledger mlflow sync needs mlflow: pip install 'training-ledger[mlflow]'")
    from ledger.hooks.mlflow import sync

    done = sync(ledger_path, run_id, tracking_uri, report=report_path)
    click.echo(f"mirrored {done.metrics} metric values and {done.parts} parts; the run holds entries through seq "
               f"{done.cursor}" + ("; report uploaded as ledger/report.html" if report_path else ""))


@cli.command(name="compare")
@click.argument("first", metavar="A.safetensors", type=click.Path())
@click.argument("second", metavar="B.safetensors", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def compare_cmd(first: str, second: str, as_json: bool) -> None:
    """Test whether B is derived from A (or A from B) from the weights alone: "derived" (exit 1) or
    "not shown to be derived" (exit 0). Without a ledger, independence cannot be shown."""
    import importlib.util

    from ledger.errors import FormatError
    from ledger.verify import compare_files
    from ledger.verify._inputs import require_file

    for path in (first, second):
        require_file(path, "weights file")
    if importlib.util.find_spec("scipy") is None:
        raise ConfigurationError("ledger compare needs scipy: pip install 'training-ledger[lineage]'")
    try:
        result = compare_files(first, second)
    except FormatError as exc:  # exit 1 means "derived" here: a file that cannot be read is exit 2
        raise ConfigurationError(f"cannot compare: {exc}") from exc
    out = {"a": first, "b": second, **result.to_dict()}
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(f"{result.verdict}: {result.reason}")
        click.echo(f"  constrained test (Hungarian + Spearman, {result.matrices} matrices): p = {result.p_csu:.3g}")
        click.echo(f"  unconstrained test (two matchings, {result.mlp_pairs} MLP pairs): p = {result.p_match:.3g}")
        if result.layernorm_cosine is not None:
            click.echo(f"  LayerNorm cosine {result.layernorm_cosine:.4f} (null baseline "
                       f"{result.layernorm_cosine_null:.4f}, Pearson {result.layernorm_pearson:.4f}): "
                       f"{result.layernorm_note}")
    sys.exit(EXIT_FAIL if result.verdict == "derived" else EXIT_PASS)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and map every outcome to a documented exit code."""
    args = sys.argv[1:] if argv is None else argv
    try:
        # click returns a command's ctx.exit(code) as the value in this mode (errors of a command
        # are mapped to their exit code by _Commands.invoke)
        code = cli.main(args=args, prog_name="ledger", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else EXIT_PASS)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors and bad parameters: one line too
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        click.echo(f"ledger: error: {printable(exc.format_message())}{printable(hint)}", err=True)
        sys.exit(EXIT_CANNOT_RUN)
    except click.exceptions.Abort:
        click.echo("ledger: aborted", err=True)
        sys.exit(EXIT_CANNOT_RUN)
