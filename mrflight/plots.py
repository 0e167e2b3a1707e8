"""Figures for evaluation: predicted-vs-true scatter, error and RMSE/bound curves, parameter maps.

All functions return a :class:`matplotlib.figure.Figure` (Agg backend, no display needed) so the
pipeline can log it through its logger objects; :func:`save_figure` writes a PNG atomically.

T1 and T2 maps use Crameri's *lipari* (T1) and *navia* (T2) colour maps (``cmcrameri``) with the
processing step recommended by Fuderer et al. 2024 (:func:`relaxation_colormap`): the colour
table is re-sampled along a "log-like" curve over the display range, its first entry is black
("invalid", for unfitted/zero voxels), and values below the lower display level are clipped to the
lowest valid colour.

References:
    Fuderer M, et al. Color-map recommendation for MR relaxometry maps. MRM 2025;93:490-506
    (doi:10.1002/mrm.30290). Crameri F, Scientific colour maps, Zenodo
    (doi:10.5281/zenodo.1243862).
"""

from __future__ import annotations

import io
import os

import matplotlib

if os.environ.get("MPLBACKEND") is None:
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap, Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mrflight.fileio import atomic_path  # noqa: E402

__all__ = ["RelaxationColormap", "relaxation_colormap", "log_remap_indices", "save_figure",
           "scatter_true_vs_pred", "error_vs_parameter", "parameter_maps", "figure_to_array",
           "METHOD_LABELS", "MIN_BIN_COUNT", "MAP_CAPTION"]

METHOD_LABELS = {"lstm": "LSTM", "gru": "GRU", "ann": "ANN (DRONE)", "cnn": "1D CNN",
                 "matching": "dictionary matching", "matching_svd": "SVD matching",
                 "crb": "Cramér–Rao bound", "truth": "truth"}

_BASE = {"T1": "lipari", "T2": "navia", "R1": "lipari", "R2": "navia", "T2*": "navia",
         "R2*": "navia", "T1rho": "navia", "R1rho": "navia"}


def log_remap_indices(n: int, vmin: float, vmax: float) -> np.ndarray:
    """Indices into an ``n``-entry colour table for Fuderer's "log-like" re-sampling.

    Entry ``g`` of the processed table (display value ``x_g = vmin + (g + 1) (vmax - vmin) / n``)
    takes the original entry returned here. Below ``a = vmax / e`` the curve is linear, above it
    logarithmic, so colour resolution follows relative (not absolute) differences in T1/T2 over
    most of the range. Entry 0 is reserved (index 0: "invalid").

    Args:
        n: length of the colour table (>= 2).
        vmin, vmax: display range, ``vmax > 0`` and ``vmax > vmin``.

    Returns:
        ``(n,)`` int array, non-decreasing, ``[0, 1, ..., <= n - 1]``.

    References:
        Fuderer et al., MRM 2025;93:490 (doi:10.1002/mrm.30290), ``colorLogRemap``.
    """
    if not vmax > 0:
        raise ValueError(f"vmax must be positive, got {vmax}")
    if not vmax > vmin:
        raise ValueError(f"vmax must be larger than vmin, got vmin={vmin}, vmax={vmax}")
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    a = vmax / np.e
    m = max(a, vmin)
    # fraction of the table spent on the linear part (plus one entry), as in the reference code
    b = 1.0 / n + ((a - vmin) / (2 * a - vmin) if a >= vmin else 0.0) + 1e-7
    g = np.arange(1, n)
    x = (g + 1) * (vmax - vmin) / n + vmin
    f = np.ones_like(x)
    log_part = x > m
    f[log_part] = n * ((np.log(m) - np.log(x[log_part])) / (np.log(m) - np.log(vmax))
                       * (1 - b) + b)
    if vmin < a:
        lin = (~log_part) & (x > vmin)
        f[lin] = n * ((x[lin] - vmin) / (a - vmin) * (b - 1.0 / n)) + 1.0
    idx = np.minimum(n, 1 + np.floor(f).astype(np.int64)) - 1
    return np.concatenate([[0], idx])


class RelaxationColormap(ListedColormap):
    """A processed lipari/navia colour map bound to a display range.

    Use ``ax.imshow(cmap.prepare(x), cmap=cmap, norm=cmap.norm)``. NaN and "invalid" values
    (below one colour step above zero, e.g. unfitted voxels) are drawn black; values between that
    and the lower level are clipped to the lowest valid colour (``below="clip"``, Fuderer's
    recommendation) or drawn black (``below="black"``).

    Attributes:
        vmin, vmax: display range (map units, e.g. ms).
        norm: the matching :class:`matplotlib.colors.Normalize`.
        below: ``"clip"`` or ``"black"``.
    """

    def __init__(self, colors, name, vmin, vmax, below="clip"):
        black = (0.0, 0.0, 0.0, 1.0)
        try:  # matplotlib >= 3.10 takes the extremes in the constructor
            super().__init__(colors, name=name, bad=black, under=black)
        except TypeError:
            super().__init__(colors, name=name)
            self.set_bad(black)
            self.set_under(black)
        self.vmin, self.vmax, self.below = float(vmin), float(vmax), below
        self.norm = Normalize(vmin=self.vmin, vmax=self.vmax)

    @property
    def step(self) -> float:
        """Width of one colour entry, in map units."""
        return (self.vmax - self.vmin) / self.N

    def prepare(self, x) -> np.ndarray:
        """Clip a map for display with this colour map (float array; NaN stays NaN = black)."""
        x = np.asarray(x, dtype=np.float64)
        eps = self.step
        invalid = x < eps if self.vmin >= 0 else np.zeros(x.shape, bool)
        low = x < self.vmin + eps
        out = np.where(low, self.vmin + 1.5 * eps, x)
        if self.below == "black":
            out = np.where(x < self.vmin, self.vmin - eps, out)
        return np.where(invalid, self.vmin - eps, out)

    def colors_of(self, x) -> np.ndarray:
        """RGBA colours ``(..., 4)`` that ``imshow`` would draw for map values ``x``."""
        return self(self.norm(self.prepare(x)))


def relaxation_colormap(name: str = "T1", vmin: float = 0.0, vmax: float | None = None,
                        n: int = 256, below: str = "clip") -> RelaxationColormap:
    """Fuderer et al.'s processed colour map for relaxation maps (lipari for T1, navia for T2).

    Args:
        name: ``"T1"`` (lipari) or ``"T2"`` (navia); ``"R1"``/``"R2"`` use the reversed tables.
        vmin: lower display level (map units, e.g. ms), ``>= 0`` for relaxation times.
        vmax: upper display level; ``None`` builds the table for ``vmin = 0`` and a unit range,
            which is valid for any ``vmax`` when ``vmin = 0`` (the remap is then scale-free);
            set ``cmap.norm`` / ``vmax`` when drawing.
        n: colour-table length.
        below: ``"clip"`` (default, Fuderer: below the lower level -> lowest valid colour; only
            "invalid" values near zero and NaN are black) or ``"black"`` (everything below the
            lower level black).

    Returns:
        :class:`RelaxationColormap` (a ``ListedColormap``) with ``.norm`` and ``.prepare(x)``.

    References:
        Fuderer M, et al. Color-map recommendation for MR relaxometry maps. MRM 2025;93:490-506
        (doi:10.1002/mrm.30290).
    """
    from cmcrameri import cm

    key = name if name in _BASE else name.upper()
    if key not in _BASE:
        raise ValueError(f"name must be one of {sorted(_BASE)}, got {name!r}")
    if below not in ("clip", "black"):
        raise ValueError(f"below must be 'clip' or 'black', got {below!r}")
    if vmax is None:
        if vmin != 0:
            raise ValueError("give vmax when vmin != 0: the remap depends on the range")
        vmax = 1.0
    table = getattr(cm, _BASE[key])(np.linspace(0, 1, n))
    if key.startswith("R"):
        table = table[::-1]
    table = table.copy()
    table[0, :3] = 0.0  # "invalid" colour
    table = table[log_remap_indices(n, vmin, vmax)]
    return RelaxationColormap(table, f"{_BASE[key]}_{name}_fuderer", vmin, vmax, below)


def save_figure(fig: Figure, path, dpi: int = 110) -> None:
    """Write ``fig`` as a PNG atomically (``fileio.atomic_path``)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")


def figure_to_array(fig: Figure, dpi: int = 80) -> np.ndarray:
    """RGB(A) pixel array of a figure (for loggers that take images)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    buf.seek(0)
    return plt.imread(buf)


def _label(m: str) -> str:
    """A method's name as the tables write it: ``GRU [run]`` for the key ``gru [run]``."""
    head, sep, rest = m.partition(" ")
    return METHOD_LABELS.get(m) or METHOD_LABELS.get(head, head) + sep + rest


def _plain_log_ticks(axis) -> None:
    """Plain numbers (600, 0.5) on a log axis instead of 6x10^2, 5x10^-1 (minor ticks labelled
    only where the axis spans less than a decade or so)."""
    from matplotlib.ticker import LogFormatter

    class _Plain(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            return f"{x:g}"

    axis.set_major_formatter(_Plain())
    axis.set_minor_formatter(_Plain(labelOnlyBase=False, minor_thresholds=(1, 0.5)))


def scatter_true_vs_pred(truth, predictions: dict, title: str = "",
                         max_points: int = 5000) -> Figure:
    """Predicted versus true T1 and T2, one column per method.

    Args:
        truth: ``(N, 2)`` true T1, T2 (ms).
        predictions: ``{method: (N, 2) predicted T1, T2 (ms)}``.
        title: figure title.
        max_points: at most this many points are drawn per panel (evenly strided).

    Returns:
        Figure with 2 rows (T1, T2) x one column per method, the panels of a row on the same
        axes so that the methods' spreads compare; each panel's title holds the RMSE over all
        ``N`` signals (the ``t1_rmse_ms`` / ``t2_rmse_ms`` of ``metrics.json``).
    """
    truth = np.asarray(truth, dtype=np.float64)
    methods = list(predictions)
    ncol = max(1, len(methods))
    fig, axes = plt.subplots(2, ncol, figsize=(3.2 * ncol, 6.2), squeeze=False, sharex="row",
                             sharey="row")
    stride = max(1, len(truth) // max_points)
    for j, m in enumerate(methods):
        pred = np.asarray(predictions[m], dtype=np.float64)
        for i, unit in enumerate(("T1", "T2")):
            ax = axes[i, j]
            t, p = truth[::stride, i], pred[::stride, i]
            lo, hi = float(np.nanmin(t)), float(np.nanmax(t))
            ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--")
            ax.scatter(t, p, s=3, alpha=0.4, color="C0" if i == 0 else "C3", linewidths=0)
            ax.set_xlabel(f"true {unit} (ms)")
            if j == 0:
                ax.set_ylabel(f"predicted {unit} (ms)")
            e = pred[:, i] - truth[:, i]  # every signal, as metrics.json (NaN -> NaN)
            ax.set_title(f"{_label(m)}: {unit}, RMSE {np.sqrt(np.mean(e ** 2)):.3g} ms",
                         fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


#: bins of the error curves with fewer signals are not drawn (a sparse bin's RMSE is noise)
MIN_BIN_COUNT = 20

#: line styles and markers cycled over methods so that overlaid curves stay distinguishable
_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"),
           ((0, (3, 1, 1, 1)), "P"), ((0, (1, 1)), "X")]


def _style(k: int) -> dict:
    ls, marker = _STYLES[k % len(_STYLES)]
    return {"color": f"C{k % 10}", "ls": ls, "marker": marker, "ms": 4, "mfc": "none",
            "lw": 1.3}


def _binned(x, y, edges, fn, min_count: int = 3):
    out = np.full(len(edges) - 1, np.nan)
    which = np.digitize(x, edges) - 1
    for b in range(len(edges) - 1):
        sel = (which == b) & np.isfinite(y)
        if sel.sum() >= min_count:
            out[b] = fn(y[sel])
    return out


def _counts(x, edges) -> np.ndarray:
    return np.histogram(x[np.isfinite(x)], bins=edges)[0]


def _count_bars(ax, edges, counts, min_count: int) -> None:
    """Signals per bin as light bars on a secondary axis (sparse bins hatched)."""
    tw = ax.twinx()
    widths = np.diff(edges)
    sparse = counts < min_count
    tw.bar(edges[:-1], counts, width=widths, align="edge", color="0.85", zorder=0)
    if sparse.any():
        tw.bar(edges[:-1][sparse], counts[sparse], width=widths[sparse], align="edge",
               color="none", edgecolor="0.6", hatch="//", zorder=0)
    tw.set_ylim(0, max(1, counts.max()) * 4)  # bars in the lower quarter
    tw.set_ylabel("signals per bin", color="0.5", fontsize=8)
    tw.tick_params(axis="y", colors="0.5", labelsize=7)
    ax.set_zorder(tw.get_zorder() + 1)
    ax.patch.set_visible(False)


def error_vs_parameter(truth, predictions: dict, bound=None, n_bins: int = 15,
                       title: str = "", min_count: int = MIN_BIN_COUNT) -> Figure:
    """Binned RMSE against true T1 and T2 (top row) and RMSE / Cramér–Rao bound (bottom row).

    Every panel shows the number of signals per bin (grey bars, right axis); bins with fewer
    than ``min_count`` signals are hatched and their RMSE is not drawn (a handful of signals
    gives an RMSE that is mostly noise). Methods differ by colour, line style and marker; their
    legend stands to the right of the panels, never over a curve.

    Args:
        truth: ``(N, 2)`` true T1, T2 (ms).
        predictions: ``{method: (N, 2)}`` predicted T1, T2 (ms).
        bound: optional ``(N, 2)`` Cramér–Rao standard-deviation bound per signal (ms); rows may
            be NaN where the bound was not computed (a subset). The top row then shows the RMS
            bound per bin, the bottom row ``RMSE / RMS(bound)`` per bin on the signals with a
            bound (1 = efficient), in coarser bins when the subset is small.
        n_bins: bins along each true parameter (at most; fewer where the test set is small, so
            that a bin holds about ``2 * min_count`` signals).
        title: figure title.
        min_count: bins with fewer signals are not drawn.
    """
    truth = np.asarray(truth, dtype=np.float64)
    rows = 2 if bound is not None else 1
    fig, axes = plt.subplots(rows, 2, figsize=(10.5, 3.8 * rows), squeeze=False)
    rms = lambda v: float(np.sqrt(np.nanmean(v**2)))
    # as many bins as keep about 2 x min_count signals in each: with fixed n_bins a small test
    # set (a few hundred signals) left every bin sparse and the methods' curves empty
    n_all = int(np.isfinite(truth).all(1).sum())
    n_bins = int(max(2, min(n_bins, n_all // (2 * min_count))))
    if bound is not None:
        bound = np.asarray(bound, dtype=np.float64)
        has = np.isfinite(bound).all(1)
        nb_bound = int(max(2, min(n_bins, has.sum() // (2 * min_count))))
    for i, unit in enumerate(("T1", "T2")):
        x = truth[:, i]
        edges = np.linspace(np.nanmin(x), np.nanmax(x) + 1e-9, n_bins + 1)
        centres = 0.5 * (edges[1:] + edges[:-1])
        ax = axes[0, i]
        for k, (m, pred) in enumerate(predictions.items()):
            err = np.asarray(pred, dtype=np.float64)[:, i] - x
            ax.plot(centres, _binned(x, err, edges, rms, min_count), label=_label(m),
                    **_style(k))
        if bound is not None:
            eb = np.linspace(np.nanmin(x), np.nanmax(x) + 1e-9, nb_bound + 1)
            cb = 0.5 * (eb[1:] + eb[:-1])
            rb = _binned(x[has], bound[has, i], eb, rms, min_count)
            ax.plot(cb, rb, color="k", ls="--", marker="x", ms=4, label=_label("crb"))
            for k, (m, pred) in enumerate(predictions.items()):
                err = np.asarray(pred, dtype=np.float64)[has, i] - x[has]
                ratio = _binned(x[has], err, eb, rms, min_count) / rb
                axes[1, i].plot(cb, ratio, label=_label(m), **_style(k))
            axes[1, i].axhline(1.0, color="k", ls="--", lw=0.8)
            axes[1, i].set_yscale("log")
            _plain_log_ticks(axes[1, i].yaxis)
            axes[1, i].set_xlabel(f"true {unit} (ms)")
            axes[1, i].set_ylabel(f"{unit} RMSE / bound" + (
                f" ({int(has.sum())} signals)" if not has.all() else ""))
            _count_bars(axes[1, i], eb, _counts(x[has], eb), min_count)
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
        ax.set_xlabel(f"true {unit} (ms)")
        ax.set_ylabel(f"{unit} RMSE (ms)")
        _count_bars(ax, edges, _counts(x, edges), min_count)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # one legend beside the panels, not over their curves (a sweep has many methods)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)
    fig.text(0.01, 0.0, f"Grey bars: signals per bin (right axis); bins with fewer than "
             f"{min_count} signals are hatched and not drawn.", fontsize=7, color="0.35",
             va="top")
    return fig


#: caption of the map figures (the colour-map jargon, out of the title)
MAP_CAPTION = ("Colour maps: lipari (T1) and navia (T2), Crameri's scientific colour maps, with "
               "the log-like processing recommended by Fuderer et al. 2024; black = no estimate. "
               "Error maps: (predicted - true) / true, vik colour map; grey = background or no "
               "estimate.")

#: colour of voxels without a relative error (background, no estimate): vik's centre is near
#: white, so a white background would read as zero error
ERROR_BAD_COLOUR = (0.62, 0.62, 0.62, 1.0)


def parameter_maps(truth: dict, maps: dict, mask=None, t1_range=(0.0, 3000.0),
                   t2_range=(0.0, 300.0), error_range: tuple[float, float] | None = None,
                   title: str = "", outside=None, caption: str | None = MAP_CAPTION) -> Figure:
    """T1 and T2 maps of every method beside the truth, with error maps.

    Args:
        truth: ``{"t1_ms": (H, W), "t2_ms": (H, W)}``.
        maps: ``{method: {"t1_ms": (H, W), "t2_ms": (H, W)}}`` (NaN outside the object).
        mask: ``(H, W)`` bool; voxels outside are drawn black.
        t1_range, t2_range: display levels (ms) of the processed lipari / navia maps; truth
            values above them are outlined and counted in the panel title.
        error_range: symmetric limits of the error maps as fractions of the true value
            (default +-50 %): errors are shown relative, ``(pred - true) / true``.
        title: figure title.
        outside: ``(H, W)`` bool, voxels outside the training range (outlined in red on every
            panel, and shown in the truth row).
        caption: text under the figure (``None``: none).

    Returns:
        Figure with one row per method (first the truth) and columns T1, T1 error, T2, T2 error.
        The truth row's error columns show which voxels lie above the display range (T1, T2)
        and outside the training range.
    """
    from cmcrameri import cm
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import PercentFormatter

    rows = [("truth", truth)] + list(maps.items())
    ecmap = cm.vik.with_extremes(bad=ERROR_BAD_COLOUR)
    c1 = relaxation_colormap("T1", *t1_range)
    c2 = relaxation_colormap("T2", *t2_range)
    elim = error_range or (-0.5, 0.5)
    fig, axes = plt.subplots(len(rows), 4, figsize=(13, 2.9 * len(rows)), squeeze=False,
                             layout="constrained")
    outside = None if outside is None else np.asarray(outside, dtype=bool)
    flag = ListedColormap([(0, 0, 0, 0), (0.85, 0.1, 0.1, 1.0)])

    def outline(ax):
        if outside is not None and outside.any():
            ax.contour(outside.astype(float), levels=[0.5], colors="red", linewidths=0.8)

    for r, (name, mp) in enumerate(rows):
        for c, (key, cmap) in enumerate((("t1_ms", c1), ("t2_ms", c2))):
            v = np.asarray(mp[key], dtype=np.float64)
            if mask is not None:
                v = np.where(mask, v, np.nan)
            ax = axes[r, 2 * c]
            im = ax.imshow(cmap.prepare(v), cmap=cmap, norm=cmap.norm, interpolation="nearest")
            fig.colorbar(im, ax=ax, shrink=0.85, label="ms", extend="max")
            label = f"{_label(name)}: {key[:2].upper()} (ms)"
            above = np.isfinite(v) & (v > cmap.vmax)
            if name == "truth" and above.any():
                label += f", {int(above.sum())} voxels > {cmap.vmax:g}"
            ax.set_title(label, fontsize=9)
            outline(ax)
            ax = axes[r, 2 * c + 1]
            if name == "truth":
                # not empty: where the truth leaves the display range (and the training range)
                show = above.astype(float) if outside is None else np.maximum(above, outside)
                ax.imshow(np.where(np.isfinite(v), show, np.nan), cmap=flag, vmin=0, vmax=1,
                          interpolation="nearest")
                ax.set_facecolor("0.9")
                what = f"{key[:2].upper()} > {cmap.vmax:g} ms"
                if outside is not None:
                    what += " or outside training range"
                ax.set_title(f"truth: {what} (red)", fontsize=8)
                continue
            t = np.asarray(truth[key], dtype=np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                rel = (v - t) / t
            im = ax.imshow(rel, cmap=ecmap, vmin=elim[0], vmax=elim[1],
                           interpolation="nearest")
            fig.colorbar(im, ax=ax, shrink=0.85, label="(pred - true) / true", extend="both",
                         format=PercentFormatter(1.0, decimals=0))
            ax.set_title(f"{_label(name)}: {key[:2].upper()} rel. error", fontsize=9)
            outline(ax)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    notes = []
    if outside is not None and outside.any():
        notes.append(f"Red outline: {int(outside.sum())} voxels whose true T1 or T2 lies outside "
                     "the training range (every method extrapolates there).")
    if caption:
        notes.append(caption)
    if notes:
        fig.text(0.01, -0.005, "\n".join(notes), fontsize=7, color="0.3", va="top",
                 wrap=True)
    return fig


def efficiency_map(rows: list[dict], b1: float = 1.0, title: str | None = None) -> Figure:
    """RMSE/CRB of T1 and T2 over the T1-T2 plane, one row of panels per method.

    Args:
        rows: rows of :func:`mrflight.efficiency.efficiency_report`; those at ``b1`` are drawn.
        b1: the B1 value of the points drawn.
        title: figure title (``None``: the noise level and realisations per point, from rows).

    Returns:
        The figure: each cell is a test point, coloured and labelled by RMSE/CRB (1 = the bound;
        the colour scale is logarithmic from 1/4 to 4, centred on 1, colour-blind safe).
    """
    from cmcrameri import cm
    from matplotlib.colors import LogNorm

    rows = [r for r in rows if abs(r["b1"] - b1) < 1e-9]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    t1 = sorted({r["t1_ms"] for r in rows})
    t2 = sorted({r["t2_ms"] for r in rows})
    fig = Figure(figsize=(8.5, 3.6 * max(1, len(methods))), layout="constrained")
    axes = fig.subplots(max(1, len(methods)), 2, squeeze=False)
    norm = LogNorm(0.25, 4.0)  # symmetric about 1 in log: the bound is the neutral colour
    cmap = cm.vik
    for i, m in enumerate(methods):
        for j, q in enumerate(("t1", "t2")):
            grid = np.full((len(t2), len(t1)), np.nan)
            for r in rows:
                if r["method"] == m and r.get(f"{q}_rmse_over_crb") is not None:
                    grid[t2.index(r["t2_ms"]), t1.index(r["t1_ms"])] = r[f"{q}_rmse_over_crb"]
            ax = axes[i, j]
            im = ax.imshow(grid, origin="lower", cmap=cmap, norm=norm, aspect="auto")
            for (yy, xx), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    # short labels that fit a cell (155, not 1.6e+02); white on dark cells
                    txt = f"{v:.2g}" if v < 10 else f"{v:.0f}"
                    dark = abs(np.log(max(v, 1e-12)) / np.log(4.0)) > 0.55
                    ax.text(xx, yy, txt, ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
            ax.set_xticks(range(len(t1)), [f"{v:.0f}" for v in t1], rotation=45, fontsize=7)
            ax.set_yticks(range(len(t2)), [f"{v:.0f}" for v in t2], fontsize=7)
            ax.set_xlabel("true T1 (ms)")
            ax.set_ylabel("true T2 (ms)")
            ax.set_title(f"{_label(m)}: {q.upper()} RMSE / CRB (B1 = {b1:g})", fontsize=9)
            cb = fig.colorbar(im, ax=ax, shrink=0.8, extend="both",
                              label=f"{q.upper()} RMSE / CRB")
            _plain_log_ticks(cb.ax.yaxis)
    if title is None and rows:
        title = (f"RMSE / Cramér–Rao bound, noise std {rows[0]['noise_std']:g}, "
                 f"{rows[0]['n']} noise draws per point")
    if title:
        fig.suptitle(title)
    return fig
