"""What an evaluation computes: :class:`EvalSettings` (``mrflight/configs/eval.yaml``, node
``evaluation``), checked on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mrflight.physics.checks import is_number

__all__ = ["EvalSettings"]

#: bytes per pixel of one phantom that stay in memory until the outputs are written: 128 for
#: the truth maps, labels, masks and figures, plus 48 for the T1/T2 maps of each of up to 7
#: methods (four networks, exhaustive and SVD matching, one spare); rounded up from the peak RSS
#: measured with six methods and plots (about 400 per phantom at sizes 1024 and 2048); used to
#: refuse sizes that cannot fit
_BYTES_PER_PIXEL = 128 + 48 * 7


@dataclass
class EvalSettings:
    """What ``eval.py`` evaluates (``mrflight/configs/eval.yaml``, node ``evaluation``).

    Args:
        n_test: test signals per test set (the paper used 5000).
        noise_levels: noise standard deviations (relative to the unit-norm fingerprint).
        test_sets: any of ``"paper"`` (held-out grid atoms) and ``"offgrid"`` (continuous).
        split_seed: grid/test split seed when no run config gives one.
        noise_seed: seed of the test noise (one stream per test set and noise level).
        offgrid_seed: seed of the off-grid parameters.
        svd_rank: rank of SVD matching (``None``: skip SVD matching).
        complex_matching: match complex fingerprints (``|<d, s>|``) instead of magnitudes.
        bound: compute the Cramér–Rao bound rows and RMSE/bound ratios.
        bound_signals: test signals per set on which the bound is computed (a seeded subset;
            ``None``: every test signal).
        bound_magnitude: bound for magnitude data (what the paper's methods see), else complex.
        latency_repeats: single-signal calls timed per method (latency mean ± std over these).
        phantoms: any of ``"brain"`` and ``"nist"``.
        phantom_size: phantom image side in pixels (>= 16 for the brain, >= 32 for the NIST
            phantom). The phantom signals are simulated, noised and estimated in blocks of
            bounded memory; the maps themselves (about 0.5 kB per pixel and phantom with every
            method and the figures) must fit in the available memory, else the size is refused
            before the evaluation starts.
        phantom_noise_std: noise of the phantom signals (``None``: the level nearest 0.01).
        plots: write figures.
        batch_size: batch size of network inference.
        device: ``"cpu"`` or ``"cuda"``.
        grid: the dictionary grid used when no run config gives one: a config node
            ``{"_target_": ..., **kwargs}`` returning ``(M, 2)`` T1, T2 in ms (``None``:
            :func:`mrflight.dictionary.paper_grid`).
        efficiency: the efficiency report (:func:`mrflight.efficiency.efficiency_report`): bias,
            std, RMSE and their ratios to the bound on an 8 x 8 T1-T2 grid (x B1 0.8, 1.0, 1.2
            when a model estimates B1) with ``efficiency_realizations`` noise draws per point at
            ``efficiency_noise_std``.
        offgrid_b1: the continuous test set with B1 in [0.8, 1.2], proton density 0.5-1.0
            and a global phase per signal (``offgrid_b1_signals`` signals at noise 0.01),
            against the bound with T1, T2, B1 and the complex scale unknown.
        robustness: the robustness table (:func:`mrflight.efficiency.robustness_report`).
        tissue_voxels: voxels per tissue and proton density in its tissue medians.
        tissue_noise_std: absolute noise of those tissue voxels (``None``: the geometric mean of
            each model's training noise range).
        matching_b1: in these three reports, also match against a (T1, T2, B1) dictionary
            (:func:`mrflight.evaluation.methods.b1_dictionary`: T1 100 log-spaced values in
            80-5000 ms, T2 80 in 8-600 ms, B1 0.70-1.30 in steps of 0.05; complex matching in a
            rank-``svd_rank`` SVD basis, or exhaustive when ``svd_rank`` is null).
        fit: in these three reports, also every network (and the (T1, T2, B1) matching)
            followed by the maximum-likelihood fit of T1, T2 (and B1) started at its estimates
            (:func:`mrflight.physics.fit.fit`), as the method ``NAME + fit``.
        fit_iterations: Levenberg-Marquardt iterations of that fit.
    """

    n_test: int = 1000
    noise_levels: list = field(default_factory=lambda: [0.005, 0.01, 0.02])
    test_sets: list = field(default_factory=lambda: ["paper", "offgrid"])
    split_seed: int = 0
    noise_seed: int = 7
    offgrid_seed: int = 11
    svd_rank: int | None = 25
    complex_matching: bool = False
    bound: bool = True
    bound_signals: int | None = None
    bound_magnitude: bool = True
    latency_repeats: int = 20
    phantoms: list = field(default_factory=lambda: ["brain", "nist"])
    phantom_size: int = 64
    phantom_noise_std: float | None = None
    plots: bool = True
    batch_size: int = 4096
    device: str = "cpu"
    grid: dict | None = None
    efficiency: bool = True
    efficiency_realizations: int = 200
    efficiency_noise_std: float = 0.01
    offgrid_b1: bool = True
    offgrid_b1_signals: int = 2000
    robustness: bool = True
    tissue_voxels: int = 2000
    tissue_noise_std: float | None = 0.01
    matching_b1: bool = True
    fit: bool = False
    fit_iterations: int = 15

    def __post_init__(self) -> None:
        if self.grid is not None:
            from mrflight.config import to_plain

            self.grid = to_plain(self.grid)
            if not (isinstance(self.grid, dict) and "_target_" in self.grid):
                raise ValueError("evaluation.grid must be null or a config with _target_ "
                                 "(e.g. mrflight.dictionary.regular_grid)")
        # one value on the command line (evaluation.noise_levels=0.01, test_sets=paper) is a
        # list of one, not a TypeError or a string's letters
        self.noise_levels = [float(x) for x in _as_list(self.noise_levels)]
        self.test_sets = _as_list(self.test_sets)
        self.phantoms = _as_list(self.phantoms)
        if int(self.n_test) < 2:
            raise ValueError(f"evaluation.n_test must be >= 2, got {self.n_test}")
        if not self.noise_levels or any(not (x >= 0 and math.isfinite(x))
                                        for x in self.noise_levels):
            raise ValueError(f"evaluation.noise_levels must be a non-empty list of noise stds "
                             f">= 0, e.g. [0.005, 0.01, 0.02], got {self.noise_levels}")
        bad = set(self.test_sets) - {"paper", "offgrid"}
        if bad or not self.test_sets:
            raise ValueError(f"evaluation.test_sets must be a non-empty subset of ['paper', "
                             f"'offgrid'], got {self.test_sets}")
        bad = set(self.phantoms) - {"brain", "nist"}
        if bad:
            raise ValueError(f"evaluation.phantoms must be a subset of ['brain', 'nist'], got "
                             f"{self.phantoms}")
        if self.svd_rank is not None and int(self.svd_rank) < 1:
            raise ValueError(f"evaluation.svd_rank must be >= 1 or null, got {self.svd_rank}")
        if not _is_int(self.batch_size, 1):
            raise ValueError(f"evaluation.batch_size must be an integer >= 1 (signals per "
                             f"network call), got {self.batch_size!r}")
        if int(self.latency_repeats) < 2:
            raise ValueError("evaluation.latency_repeats must be >= 2 (a std needs two calls)")
        if self.bound_signals is not None and not _is_int(self.bound_signals, 1):
            raise ValueError(f"evaluation.bound_signals must be null (the bound for every test "
                             f"signal) or an integer >= 1, got {self.bound_signals!r}")
        if self.phantom_noise_std is not None and not (
                0 <= float(self.phantom_noise_std) < math.inf):
            raise ValueError(f"evaluation.phantom_noise_std must be null or a finite number "
                             f">= 0, got {self.phantom_noise_std!r}")
        if self.phantoms:
            self._check_phantom_size()
        self.n_test = int(self.n_test)
        if int(self.efficiency_realizations) < 2:
            raise ValueError(f"evaluation.efficiency_realizations must be >= 2, got "
                             f"{self.efficiency_realizations}")
        if not (self.efficiency_noise_std > 0 and math.isfinite(self.efficiency_noise_std)):
            raise ValueError(f"evaluation.efficiency_noise_std must be > 0, got "
                             f"{self.efficiency_noise_std}")
        if not _is_int(self.fit_iterations, 1):
            raise ValueError(f"evaluation.fit_iterations must be an integer >= 1, got "
                             f"{self.fit_iterations!r}")
        if int(self.offgrid_b1_signals) < 2:
            raise ValueError(f"evaluation.offgrid_b1_signals must be >= 2, got "
                             f"{self.offgrid_b1_signals}")

    def _check_phantom_size(self) -> None:
        low = 32 if "nist" in self.phantoms else 16
        size = self.phantom_size
        if not _is_int(size, low):
            which = "the NIST phantom draws" if low == 32 else "the brain phantom draws"
            raise ValueError(f"evaluation.phantom_size must be an integer >= {low} ({which} "
                             f"at least {low} x {low} pixels), got {size!r}")
        need = int(size) ** 2 * _BYTES_PER_PIXEL * len(self.phantoms)
        free = _available_memory()
        if free is not None and need > free:
            raise ValueError(
                f"evaluation.phantom_size={size} needs about {need / 2**30:.1f} GiB for the "
                f"phantom maps ({len(self.phantoms)} phantom(s) of {size} x {size} pixels) but "
                f"{free / 2**30:.1f} GiB are available: lower evaluation.phantom_size (64 to "
                "512 shows the maps well) or set evaluation.phantoms=[]")

    @property
    def plot_noise_std(self) -> float:
        return min(self.noise_levels, key=lambda x: abs(math.log((x + 1e-12) / 0.01)))


def _as_list(v) -> list:
    """``v`` as a list: a single name or number becomes a list of one."""
    return [v] if isinstance(v, (str, int, float)) else list(v)


def _is_int(v, low: int) -> bool:
    """``v`` is a whole number (not a bool) >= ``low``."""
    return is_number(v, whole=True) and v >= low


def _available_memory() -> int | None:
    """Memory available to a new allocation, bytes (``MemAvailable``), or ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
