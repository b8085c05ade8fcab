"""The HTML report (`ledger verify --report`): written by the real CLI, then opened in a real
headless Chromium (every plot decodes, the checks table is there); a screenshot is kept in
test-artifacts/report.png. Chromium is driven by its command line only (no extra Python package)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXED_SEED
from recipes import TinyRecipe

from ledger import Signer
from ledger._crypto import public_key_pem
from ledger.hooks import FingerprintOptions, train
from ledger.verify import CheckResult, Report, render_html
from ledger.verify._lineage import LN_SENTENCE

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
RECIPE_SPEC = f"{Path(__file__).with_name('recipes.py')}:recipe"
SIGNER = Signer.from_seed(FIXED_SEED)

# Appended to a copy of the page: once everything has loaded, the result goes into <body>'s
# attributes, which --dump-dom then prints.
PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var checks = document.querySelector("table#checks");
  var body = document.body;
  body.setAttribute("data-images", String(images.length));
  body.setAttribute("data-images-ok", String(ok));
  body.setAttribute("data-checks-rows", checks ? String(checks.tBodies[0].rows.length) : "missing");
  body.setAttribute("data-height", String(document.documentElement.scrollHeight));
  body.setAttribute("data-probe", "done");
});
</script>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    assert binary is not None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_report_renders_in_a_real_browser(tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("no chromium binary on PATH (scripts/setup.sh installs it with apt-get when run as root)")
    path = train(TinyRecipe(), steps=24, path=tmp_path / "L", key=SIGNER, seed=3, checkpoint_every=6,
                 fingerprints=FingerprintOptions(sketch=1),
                 final_weights=tmp_path / "model.safetensors")
    pub = tmp_path / "trainer.pub"
    pub.write_bytes(public_key_pem(SIGNER.public.raw))
    page = tmp_path / "out" / "nested" / "report.html"
    out = subprocess.run([sys.executable, "-m", "ledger", "verify", str(path), "--key", str(pub), "--model",
                          str(tmp_path / "model.safetensors"), "--recipe", RECIPE_SPEC, "--replay-seed", "1",
                          "--json", "--report", str(page)], capture_output=True, text=True, timeout=300,
                         env={**os.environ})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)  # --report leaves stdout pure JSON
    assert report["verdict"] == "pass"
    assert f"report written to {page}" in out.stderr
    text = page.read_text(encoding="utf-8")
    # self-contained: nothing to fetch, every image inline
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:|//|file:)""", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    sources = re.findall(r'<img [^>]*src="([^"]*)"', text)
    assert len(sources) >= 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<title>Ledger verification: PASS</title>" in text and 'id="sentence"' in text

    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dumped = chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri(), profile=tmp_path / "profile")
    match = re.search(r"<body([^>]*)>", dumped.stdout)
    assert match, f"chromium printed no DOM (rc {dumped.returncode}): {dumped.stderr[-2000:]}"
    attrs = dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', match.group(1)))
    assert attrs.get("data-probe") == "done", attrs
    assert int(attrs["data-images"]) == len(sources)
    assert attrs["data-images-ok"] == attrs["data-images"], f"images that did not decode: {attrs}"
    assert attrs["data-checks-rows"] == str(len(report["checks"]))

    height = min(max(int(attrs.get("data-height", "2000")), 800), 8000)
    shot = tmp_path / "report.png"
    taken = chromium(f"--screenshot={shot}", f"--window-size=1280,{height}", page.as_uri(),
                     profile=tmp_path / "profile")
    assert shot.is_file() and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "report.png")
    shutil.copyfile(page, ARTIFACTS / "report.html")


def test_report_without_ledger_data_notes_absent_plots_and_shows_lineage(tmp_path):
    against = [
        {"file": "/x/foreign<b>.safetensors", "verdict": "derived", "p_value": 1e-12, "layernorm_cosine": 0.998,
         "layernorm_cosine_null": 0.97, "layernorm_pearson": 0.91,
         "trajectory": {"steps": [-1, 0, 1, 2], "distance": [5.0, 4.0, 2.5, 1.0], "baseline": 5.0}},
        {"file": "/x/other.safetensors", "verdict": "not shown to be derived", "p_value": 0.4,
         "layernorm_cosine": 0.97, "layernorm_cosine_null": 0.969, "layernorm_pearson": None},
    ]
    report = Report((CheckResult("chain", "pass", "ok <script>alert(1)</script>", {"entries": 3}),
                     CheckResult("continuity", "skip", "no recorded steps"),
                     CheckResult("independence", "fail", "derived", {"against": against})),
                    {"path": str(tmp_path / "missing"), "run_id": "r1", "entries": 3, "sealed": False})
    text = render_html(report)
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert 'id="checks"' in text and 'id="lineage"' in text and "foreign&lt;b&gt;.safetensors" in text
    assert text.count("<img ") == 2  # the trajectory and the LayerNorm panel; the ledger's plots are notes
    assert "No loss plot: the report holds no loss series" in text  # rendered from the report alone
    assert "No update plot: continuity skip: no recorded steps" in text
    assert "No distance-from-init plot" in text
    assert LN_SENTENCE in text
    assert "independence" in text and "1e-12" in text
