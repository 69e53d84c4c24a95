"""The benchmark's plain-hook variant does exactly what vlmask's traces do (else its timing means nothing)."""

from __future__ import annotations

import xarray as xr

import vlmask
from benchmarks.hooks import plain_hooks


class _NoTrace:
    def __getattr__(self, name):
        raise AssertionError(f"nnsight was used ({name}) inside plain_hooks")


def test_plain_hooks_sweep_equals_nnsight_sweep(tiny, images, monkeypatch):
    kwargs = dict(mask="all", num_tokens=4, progress=False)
    traced = vlmask.sweep(tiny, "what color is the circle ?", [images["square"]], **kwargs)
    with plain_hooks(), monkeypatch.context() as patch:
        patch.setattr(tiny, "traced", _NoTrace())
        hooked = vlmask.sweep(tiny, "what color is the circle ?", [images["square"]], **kwargs)
    assert float(traced["kl"].max()) > 1e-3  # the knockouts do something
    differs = traced["masked_token_id"] != traced["step_token_id"]
    left = differs.argmax("step").where(differs.any("step"))
    assert int((left == 0).sum()) >= 2  # several leave at step 0 and generate afresh together (batched passes)
    xr.testing.assert_allclose(traced, hooked, atol=1e-5)
