"""Cross-prompt summaries: alignment by what a unit is, means and counts by hand, intervals against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import xarray as xr

import vlmask
from vlmask.batch.summary import bootstrap_ci, summarize, unit_keys
from vlmask.cli import main
from vlmask.viz.summary_plot import summary_figure

QUESTION = "what color is the circle ?"


def _result(units: list[tuple], kl: list[float], windows: list[tuple[int, int]] | None = None) -> xr.Dataset:
    """A minimal result: ``units`` as (position, kind, text, row, col); ``kl`` per unit (times the window number)."""
    positions, kinds, texts, rows, cols = zip(*units, strict=True)
    n = len(units)
    coords = {
        "step": [0],
        "token": list(positions),
        "token_kind": ("token", list(kinds)),
        "token_text": ("token", list(texts)),
        "token_image": ("token", [0 if k == "vision" else -1 for k in kinds]),
        "token_video": ("token", [-1] * n),
        "token_t": ("token", [0 if k == "vision" else -1 for k in kinds]),
        "token_row": ("token", list(rows)),
        "token_col": ("token", list(cols)),
        "token_rows": ("token", [1 if k == "vision" else 0 for k in kinds]),
        "token_cols": ("token", [1 if k == "vision" else 0 for k in kinds]),
    }
    values = np.array(kl, dtype=np.float32)[None]
    dims = ("step", "token")
    if windows:
        coords |= {
            "window": [(a + b) // 2 for a, b in windows],
            "window_start": ("window", [a for a, _ in windows]),
            "window_end": ("window", [b for _, b in windows]),
        }
        values = values[..., None] * np.arange(1, len(windows) + 1, dtype=np.float32)
        dims = ("step", "token", "window")
    data = {name: (dims, values * scale) for name, scale in (("kl", 1), ("logprob_drop", 2), ("prob_change_pct", -10))}
    return xr.Dataset(data, coords=coords)


A = _result([(3, "text", " red", -1, -1), (5, "vision", "<|image_pad|>", 0, 1)], [1.0, 4.0])
B = _result(
    [(2, "text", "red", -1, -1), (6, "text", "blue", -1, -1), (9, "vision", "<|image_pad|>", 0, 1)], [3.0, 7.0, 6.0]
)


def test_units_align_by_cell_and_text_not_position_and_means_and_counts_are_by_hand():
    assert unit_keys(A) == ["text 'red'", "image 0 r0 c1"]
    s = summarize([A, B], by="unit", resamples=200)
    assert s["kl"].sel(unit="image 0 r0 c1") == pytest.approx(5.0)  # positions 5 and 9: the same cell
    assert s["kl"].sel(unit="text 'red'") == pytest.approx(2.0)
    assert s["logprob_drop"].sel(unit="text 'red'") == pytest.approx(4.0)
    assert s["prompts"].sel(unit="image 0 r0 c1") == 2 and s["prompts"].sel(unit="text 'blue'") == 1
    # one prompt only: every resample is that prompt, the interval is the value itself
    assert s["kl_ci_low"].sel(unit="text 'blue'") == s["kl_ci_high"].sel(unit="text 'blue'") == pytest.approx(7.0)
    kinds = summarize([A, B], by="unit-kind", resamples=200)  # per prompt: the mean over the kind's units
    assert kinds["kl"].sel(unit_kind="text").item() == pytest.approx((1.0 + (3.0 + 7.0) / 2) / 2)
    assert kinds.attrs["resamples"] == 200 and kinds.attrs["seed"] == 0 and kinds.attrs["results"] == 2


def test_bootstrap_interval_matches_scipy_percentile_bootstrap():
    values = np.random.default_rng(1).gamma(2.0, 1.5, size=30)
    mean, low, high = bootstrap_ci(values[:, None], resamples=20000, seed=3)
    ref = scipy.stats.bootstrap((values,), np.mean, n_resamples=20000, method="percentile", random_state=4)
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert mean[0] == pytest.approx(values.mean())
    assert low[0] == pytest.approx(ref.confidence_interval.low, abs=0.05 * width)
    assert high[0] == pytest.approx(ref.confidence_interval.high, abs=0.05 * width)
    again = bootstrap_ci(values[:, None], resamples=20000, seed=3)
    assert again[1][0] == low[0] and again[2][0] == high[0]  # seeded: the same interval


def test_bootstrap_skips_missing_prompts_per_cell():
    values = np.array([[1.0, np.nan], [3.0, 5.0], [np.nan, 9.0]])
    mean, low, high = bootstrap_ci(values, resamples=500, seed=0)
    assert mean.tolist() == [2.0, 7.0]
    assert 1.0 <= low[0] <= high[0] <= 3.0 and 5.0 <= low[1] <= high[1] <= 9.0


def test_windows_group_by_window_label_or_centre_layer_in_layer_order():
    windows = [(0, 2), (8, 10), (4, 6)]
    a, b = _result([(5, "vision", "x", 0, 1)], [1.0], windows), _result([(7, "vision", "x", 0, 1)], [3.0], windows)
    s = summarize([a, b], by=["window", "unit_kind"], resamples=100)
    assert s["kl"].sel(window="8-10", unit_kind="vision") == pytest.approx(2.0 * 2)  # window 2 scales kl by 2
    layers = summarize([a, b], by="layer", resamples=100)
    assert sorted(layers["layer"].values.tolist()) == ["1", "5", "9"]
    for grouped, ticks in ((layers, ["1", "5", "9"]), (s, ["0-2", "4-6", "8-10"])):  # drawn in layer order
        axis = summary_figure(grouped).axes[0]
        assert [t.get_text() for t in axis.get_xticklabels()] == ticks


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"by": "colour"}, ["cannot summarize by 'colour'", "unit_kind"]),
        ({"by": "unit,unit"}, ["each grouping at most once"]),
        ({"step": 3}, ["step 3 is not in this result", "[0]"]),
        ({"resamples": 0}, ["resamples must be >= 1"]),
    ],
)
def test_mistakes_name_the_value_and_what_is_accepted(kwargs, words):
    with pytest.raises(vlmask.VlmaskError) as err:
        summarize([A], **kwargs)
    for word in words:
        assert word in str(err.value)


def test_result_without_the_metrics_is_refused():
    with pytest.raises(vlmask.VlmaskError, match="no 'logprob_drop' variable"):
        summarize([A.assign_attrs(schema_version=3).drop_vars("logprob_drop")])


def test_cli_summarizes_a_results_directory_and_draws_the_png(tmp_path, images, capsys):
    """Two real results on the built-in model (two pictures) through ``vlmask summary``."""
    for name, image in (("square", images["square"]), ("other", images["other"])):
        code = main(
            [
                "run",
                "--image",
                str(image),
                "--prompt",
                QUESTION,
                "--mask",
                "vision",
                "--num-tokens",
                "1",
                "--output",
                name,
                "--output-dir",
                str(tmp_path / "results"),
                "--no-progress",
            ]
        )
        assert code == 0
    out, png = tmp_path / "s.nc", tmp_path / "s.png"
    code = main(
        [
            "summary",
            str(tmp_path / "results"),
            "--by",
            "unit-kind",
            "-o",
            str(out),
            "--png",
            str(png),
            "--resamples",
            "100",
        ]
    )
    assert code == 0, capsys.readouterr().err
    s = xr.open_dataset(out)
    assert s.attrs["results"] == 2 and int(s["prompts"].sel(unit_kind="vision")) == 2
    with vlmask.open_batch(tmp_path / "results") as batch:  # the same numbers from open_batch's view
        again = summarize(batch, by="unit-kind", resamples=100)
        assert float(again["kl"].sel(unit_kind="vision")) == pytest.approx(float(s["kl"].sel(unit_kind="vision")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["summary", str(tmp_path / "results"), "-o", str(out)]) == 2  # exists: refused, kept
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "results" / "old-summary.nc").write_bytes(out.read_bytes())  # a summary among the results
    assert main(["summary", str(tmp_path / "results"), "-o", str(tmp_path / "u.nc")]) == 2
    assert "old-summary.nc': this is not a sweep result" in capsys.readouterr().err
    (tmp_path / "results" / "old-summary.nc").unlink()
    assert (
        main(
            [
                "summary",
                str(tmp_path / "results"),
                "--png",
                str(tmp_path / "t.png"),
                "--metric",
                "nope",
                "-o",
                str(tmp_path / "t.nc"),
            ]
        )
        == 2
    )
    assert "no metric 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "t.nc").exists() and not (tmp_path / "t.png").exists()
