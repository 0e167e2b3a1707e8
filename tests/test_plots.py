"""Plots: Fuderer colour-map processing (invalid -> black, clip below the lower level, log remap)
and the figures (finite content, atomic PNGs)."""

from pathlib import Path

import numpy as np
import pytest
from cmcrameri import cm

from mrflight.plots import (
    error_vs_parameter,
    log_remap_indices,
    parameter_maps,
    relaxation_colormap,
    save_figure,
    scatter_true_vs_pred,
)

BLACK = np.array([0.0, 0.0, 0.0, 1.0])


@pytest.mark.parametrize("lo,hi", [(0.0, 3000.0), (0.0, 1.0), (500.0, 2000.0), (50.0, 100.0)])
def test_log_remap_monotone_and_covers_table(lo, hi):
    idx = log_remap_indices(256, lo, hi)
    assert idx[0] == 0 and idx[1:].min() >= 1  # entry 0 reserved for "invalid"
    assert np.all(np.diff(idx) >= 0)
    assert idx[-1] == 255  # the upper level reaches the end of the original table


def test_log_remap_is_log_like_above_vmax_over_e():
    n, hi = 256, 3000.0
    idx = log_remap_indices(n, 0.0, hi)
    x = (np.arange(n) + 1) * hi / n
    # in the logarithmic part, equal ratios of x get (about) equal numbers of colour entries
    sel = x > hi / np.e
    slope = np.polyfit(np.log(x[sel]), idx[sel], 1)[0]
    resid = idx[sel] - np.polyval(np.polyfit(np.log(x[sel]), idx[sel], 1), np.log(x[sel]))
    assert slope > 0 and np.abs(resid).max() <= 2
    # and the remap differs from the plain linear lookup
    assert np.abs(idx - np.arange(n)).max() > 10


def test_remap_is_scale_free_for_zero_lower_level():
    assert np.array_equal(log_remap_indices(256, 0, 1.0), log_remap_indices(256, 0, 4000.0))


def test_invalid_and_nan_are_black_valid_values_are_lipari():
    c = relaxation_colormap("T1", 0.0, 3000.0)
    cols = c.colors_of([np.nan, 0.0, 3.0, 1500.0, 3000.0, 9000.0])
    assert np.allclose(cols[:3], BLACK)
    assert not np.allclose(cols[3], BLACK)
    top = np.asarray(cm.lipari(1.0))
    assert np.allclose(cols[4], top, atol=1e-6) and np.allclose(cols[5], top, atol=1e-6)
    # every colour used comes from lipari (processing re-samples, never invents colours)
    lip = cm.lipari(np.linspace(0, 1, 256))
    for col in c.colors[1:]:
        assert np.abs(lip - col).sum(1).min() < 1e-9


def test_clip_below_lower_level():
    c = relaxation_colormap("T2", 40.0, 200.0)  # navia
    lowest_valid = c(c.norm(40.0 + 1.5 * c.step))
    cols = c.colors_of([0.0, 10.0, 39.0])
    assert np.allclose(cols[0], BLACK)  # invalid (0)
    assert np.allclose(cols[1], lowest_valid) and np.allclose(cols[2], lowest_valid)
    assert not np.allclose(lowest_valid, BLACK)
    black = relaxation_colormap("T2", 40.0, 200.0, below="black")
    assert np.allclose(black.colors_of([10.0, 39.0]), BLACK)
    assert not np.allclose(black.colors_of([41.0]), BLACK)


def test_colour_order_monotone_in_value():
    # lipari and navia run from dark to light: the processed map keeps luminance increasing
    for name in ("T1", "T2"):
        c = relaxation_colormap(name, 0.0, 1000.0)
        lum = c.colors_of(np.linspace(10, 1000, 200))[:, :3] @ [0.2126, 0.7152, 0.0722]
        assert np.all(np.diff(lum) >= -0.02)
        assert lum[-1] - lum[0] > 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        relaxation_colormap("PD")
    with pytest.raises(ValueError, match="vmax"):
        relaxation_colormap("T1", 100.0, 50.0)
    with pytest.raises(ValueError, match="vmax"):
        relaxation_colormap("T1", 100.0)


def test_figures_written(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.uniform([100, 10], [3000, 300], (300, 2))
    preds = {"lstm": truth * 1.05, "matching": truth + rng.normal(0, 20, truth.shape)}
    bound = np.full_like(truth, 10.0)
    img = np.full((16, 16), 1000.0)
    figs = [scatter_true_vs_pred(truth, preds), error_vs_parameter(truth, preds, bound),
            parameter_maps({"t1_ms": img, "t2_ms": img / 10},
                           {"gru": {"t1_ms": img * 1.2, "t2_ms": img / 12}})]
    for k, fig in enumerate(figs):
        p = tmp_path / f"f{k}.png"
        save_figure(fig, p)
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in tmp_path.iterdir()] and not list(tmp_path.glob(".*tmp"))
    # the error curve of the biased method is 5 % of T1 in each bin
    ax = figs[1].axes[0]
    lstm = ax.lines[0].get_ydata()
    centres = ax.lines[0].get_xdata()
    ok = np.isfinite(lstm)
    assert np.allclose(lstm[ok], 0.05 * centres[ok], rtol=0.15)


def test_error_curves_show_counts_hide_sparse_bins_and_differ_in_style():
    rng = np.random.default_rng(1)
    # a dense low-T1 cluster and a handful of signals at high T1
    truth = np.concatenate([rng.uniform([100, 10], [1500, 200], (600, 2)),
                            rng.uniform([2800, 10], [3000, 200], (5, 2))])
    preds = {"matching": truth * 1.1, "matching_svd": truth * 1.1}  # identical curves
    fig = error_vs_parameter(truth, preds, n_bins=15)
    ax = fig.axes[0]
    a, b = ax.lines[0], ax.lines[1]
    assert (a.get_linestyle(), a.get_marker()) != (b.get_linestyle(), b.get_marker())
    y = a.get_ydata()
    assert np.isfinite(y[0]) and np.isnan(y[-1])  # the 5-signal bin is not drawn
    twins = [t for t in fig.axes if t is not ax and t.get_shared_x_axes().joined(t, ax)]
    heights = [p.get_height() for p in twins[0].patches]
    assert sum(heights[:15]) == 605  # signals per bin drawn as bars
    assert "fewer than 20 signals" in " ".join(t.get_text() for t in fig.texts)


def test_error_curve_legend_covers_no_panel_with_the_methods_of_a_sweep():
    """A sweep of four models at two noise levels, matching and the bound: eleven legend
    entries, which inside the first panel covered its curves."""
    rng = np.random.default_rng(4)
    truth = rng.uniform([100, 10], [4000, 500], (1000, 2))
    preds = {f"{m} [{j}]": truth * (1.02 + 0.01 * k) for k, (m, j) in enumerate(
        (m, j) for m in ("lstm", "gru", "ann", "cnn") for j in (0, 1))}
    preds |= {"matching": truth * 1.1, "matching_svd": truth * 1.12}
    fig = error_vs_parameter(truth, preds, bound=np.full_like(truth, 10.0))
    fig.canvas.draw()
    (legend,) = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    names = [t.get_text() for t in legend.get_texts()]
    assert len(names) == len(preds) + 1  # every method and the bound
    assert names[:2] == ["LSTM [0]", "LSTM [1]"]  # as table.md names them
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent()), ax.get_ylabel()


def test_phantom_figure_flags_out_of_range_tissue_and_keeps_jargon_in_the_caption():
    t1 = np.full((16, 16), 1000.0)
    t2 = np.full((16, 16), 80.0)
    t2[4:8, 4:8] = 1650.0  # CSF-like: above the display and the training range
    outside = t2 > 500
    fig = parameter_maps({"t1_ms": t1, "t2_ms": t2}, {"gru": {"t1_ms": t1, "t2_ms": t2 * 0.2}},
                         outside=outside, title="brain phantom")
    panels = fig.axes[::1]
    images = [ax for ax in panels if ax.images]
    assert len(images) >= 8  # 2 rows x 4 panels, none empty
    titles = " ".join(ax.get_title() for ax in panels)
    assert "16 voxels > 300" in titles
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "Fuderer" in texts and "outside the training range" in texts
    assert "Fuderer" not in fig._suptitle.get_text()


def test_small_test_set_still_draws_every_method_curve():
    # 200 signals: 15 fixed bins of ~13 signals were all below MIN_BIN_COUNT, so the figure
    # showed the bound and no method at all
    rng = np.random.default_rng(2)
    truth = rng.uniform([100, 10], [4000, 500], (200, 2))
    preds = {"gru": truth * 1.1, "matching": truth * 0.95}
    fig = error_vs_parameter(truth, preds, bound=np.full_like(truth, 10.0))
    for ax in fig.axes[:4]:
        for line in ax.lines[:2]:
            y = np.asarray(line.get_ydata(), dtype=float)
            assert np.isfinite(y).sum() >= 2, line.get_label()
    # plain numbers on the log axes, not 6x10^2
    fig.canvas.draw()
    labels = [t.get_text() for ax in fig.axes[:4] for t in ax.get_yticklabels()]
    assert labels and not any("times" in s or "^" in s or "e+" in s for s in labels)


def test_scatter_titles_hold_the_rmse_of_every_signal():
    rng = np.random.default_rng(3)
    truth = rng.uniform([100, 10], [3000, 300], (400, 2))
    pred = truth + rng.normal(0, [50, 5], truth.shape)
    fig = scatter_true_vs_pred(truth, {"gru": pred}, max_points=100)
    rmse = np.sqrt(np.mean((pred - truth) ** 2, 0))
    titles = [ax.get_title() for ax in fig.axes]
    assert f"RMSE {rmse[0]:.3g} ms" in titles[0] and f"RMSE {rmse[1]:.3g} ms" in titles[1]


def test_scatter_panels_of_a_row_share_their_axes_so_spreads_compare():
    """A method with a wider spread must not be drawn on its own, larger scale (each panel
    scaled itself, so a wild method's panel looked as tight as an accurate one's)."""
    rng = np.random.default_rng(4)
    truth = rng.uniform([100, 10], [3000, 300], (400, 2))
    preds = {"gru": truth + rng.normal(0, [20, 2], truth.shape),
             "matching": truth * rng.uniform(0.5, 2.0, truth.shape)}
    fig = scatter_true_vs_pred(truth, preds)
    axes = np.array(fig.axes).reshape(2, 2)
    for row in axes:
        assert row[0].get_ylim() == row[1].get_ylim() and row[0].get_xlim() == row[1].get_xlim()
    assert axes[0, 0].get_ylim() != axes[1, 0].get_ylim()  # T1 and T2 keep their own scales


def test_error_map_background_is_not_the_zero_error_colour():
    img = np.full((8, 8), 1000.0)
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    fig = parameter_maps({"t1_ms": img, "t2_ms": img / 10},
                         {"gru": {"t1_ms": img, "t2_ms": img / 10}}, mask=mask)
    err_axes = [ax for ax in fig.axes if "rel. error" in ax.get_title()]
    assert err_axes
    for ax in err_axes:
        im = ax.images[0]
        rgba = im.to_rgba(im.get_array())
        inside, outside = rgba[4, 4], rgba[0, 0]  # zero error / background (NaN)
        assert np.abs(inside[:3] - outside[:3]).max() > 0.15
        assert outside[3] == 1.0  # opaque, not the figure's white


def test_efficiency_map_labels_fit_and_colour_bar_says_what_it_shows():
    from mrflight.plots import efficiency_map

    rows = [{"method": "gru", "t1_ms": t1, "t2_ms": t2, "b1": 1.0, "noise_std": 0.01, "n": 200,
             "t1_rmse_over_crb": 155.0 if t1 == 300 else 1.1, "t2_rmse_over_crb": 0.9}
            for t1 in (300.0, 1000.0) for t2 in (20.0, 80.0)]
    fig = efficiency_map(rows)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "155" in texts and not any("e+" in s for s in texts)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "T1 RMSE / CRB" in labels and "T2 RMSE / CRB" in labels
    assert "noise std 0.01" in fig._suptitle.get_text()


def test_training_scatter_b1_panel_is_a_ratio_with_mae_in_percent():
    from mrflight.callbacks import _scatter_figure

    rng = np.random.default_rng(4)
    true = np.c_[rng.uniform(100, 4000, 300), rng.uniform(10, 500, 300), rng.uniform(0.8, 1.2, 300)]
    pred = true + rng.normal(0, [50, 5, 0.02], true.shape)
    fig = _scatter_figure(pred, true, ["T1", "T2", "B1"])
    ax = fig.axes[2]
    assert "ratio" in ax.get_xlabel() and ax.get_title().endswith("%")
    assert ax.get_xlim()[0] > 0.5  # B1 ~ 0.8-1.2 is not drawn from 0
    mae_pct = 100 * np.abs(pred[:, 2] - true[:, 2]).mean()
    assert f"{mae_pct:.3g} %" in ax.get_title()
    assert fig.axes[0].get_title().endswith(" ms") and "(ms)" in fig.axes[0].get_xlabel()


def _test_scatter_on_rank(rank: int, folder: str) -> None:
    """One DDP rank of :func:`test_test_scatter_shows_every_ranks_signals`."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from mrflight import callbacks

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=2)
    titles = []
    draw = callbacks._scatter_figure
    callbacks._scatter_figure = lambda *a, **kw: titles.append(kw["title"]) or draw(*a, **kw)
    cb = callbacks.ScatterPlot(dirpath=folder)
    n = 3 - rank  # the shares of 5 signals: 3 and 2
    cb._pred, cb._true = [torch.full((n, 2), 100.0)], [torch.full((n, 2), 110.0 + rank)]
    trainer = SimpleNamespace(world_size=2, is_global_zero=rank == 0, loggers=[],
                              default_root_dir=folder, global_step=0)
    cb.on_test_end(trainer, SimpleNamespace(hparams={"targets": ["t1", "t2"]}))
    dist.destroy_process_group()
    if rank == 0:
        (Path(folder) / "title.txt").write_text(titles[0])


def test_test_scatter_shows_every_ranks_signals(tmp_path):
    """Under DDP each rank tests its share of the test set; the test figure (drawn by rank 0)
    shows and titles all of them, so its MAE is the logged test MAE, not that of rank 0's
    share."""
    import torch.multiprocessing as mp

    mp.spawn(_test_scatter_on_rank, args=(str(tmp_path),), nprocs=2)
    assert (tmp_path / "scatter_test.png").is_file()
    assert "5 signals" in (tmp_path / "title.txt").read_text()
