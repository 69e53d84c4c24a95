"""The plain-hooks backend does exactly what the nnsight backend does (else the benchmark's timing means nothing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr

import vlmask
from vlmask.engine.nnsight_backend import NNsightBackend

ROOT = Path(__file__).resolve().parents[1]


def _no_nnsight(*args, **kwargs):
    raise AssertionError("the nnsight backend was used by a hooks sweep")


def test_hooks_backend_sweep_equals_nnsight_sweep(tiny, images, monkeypatch):
    kwargs = dict(mask="all", num_tokens=4, progress=False)
    traced = vlmask.sweep(tiny, "what color is the circle ?", [images["square"]], **kwargs)
    with monkeypatch.context() as patch:
        for name in ("run_model", "run_decoder", "forward_model", "forward_decoder"):
            patch.setattr(NNsightBackend, name, _no_nnsight)
        patch.setattr("vlmask.engine.nnsight_backend.envoy", _no_nnsight)
        hooked = vlmask.sweep(tiny, "what color is the circle ?", [images["square"]], backend="hooks", **kwargs)
    assert float(traced["kl"].max()) > 1e-3  # the knockouts do something
    differs = traced["masked_token_id"] != traced["step_token_id"]
    left = differs.argmax("step").where(differs.any("step"))
    assert int((left == 0).sum()) >= 2  # several leave at step 0 and generate afresh together (batched passes)
    xr.testing.assert_allclose(traced, hooked, atol=1e-5)


@pytest.mark.slow
def test_hooks_backend_never_imports_nnsight():
    code = (
        "import sys, vlmask\n"
        "vl = vlmask.load_model()\n"
        "ds = vlmask.sweep(vl, 'what color is the circle ?', mask='all', num_tokens=2, backend='hooks',"
        " progress=False)\n"
        "assert float(ds['kl'].max()) > 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'nnsight'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
