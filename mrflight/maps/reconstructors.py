"""Voxel reconstructors: ``(N, T)`` fingerprints -> T1, T2 (ms)[, B1] and M0.

:class:`MatchingReconstructor` (dictionary matching; M0 is the matcher's least-squares scale of
the best atom) and :class:`NetworkReconstructor` (a trained regressor's ``predict_parameters``;
M0 is :func:`least_squares_m0` against the fingerprint simulated at the prediction).
"""

from __future__ import annotations

import numpy as np
import torch

from mrflight.checkpoints import checkpoint_sequence
from mrflight.physics import Sequence, simulate

__all__ = ["MatchingReconstructor", "NetworkReconstructor", "least_squares_m0"]


def _to_torch(signals: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(signals)).to(device)


def least_squares_m0(measured: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:
    """Least-squares scale between measured and simulated fingerprints: ``|<d, s>| / <d, d>``.

    Args:
        measured: ``(N, T)`` complex or real fingerprints ``s``.
        simulated: ``(N, T)`` complex fingerprints ``d`` in units of M0 (``simulate``'s output);
            taken in magnitude when ``measured`` is real.

    Returns:
        ``(N,)`` float32, ``M0 = |sum conj(d) s| / sum |d|^2`` (the magnitude of the complex
        least-squares factor: a global receive phase does not change it); NaN where ``d = 0``.
    """
    d = simulated
    if not measured.is_complex():
        d = d.abs() if d.is_complex() else d
    d = d.to(measured.device)
    if measured.is_complex():
        d = d.to(measured.dtype)
        num = (d.conj() * measured).sum(-1).abs()
    else:
        num = (d.to(measured.dtype) * measured).sum(-1).abs()
    den = (d.abs() ** 2).sum(-1)
    out = num / den
    return torch.where(den > 0, out, torch.full_like(out, float("nan"))).float()


class MatchingReconstructor:
    """Dictionary matching of voxel fingerprints.

    Args:
        matcher: a :class:`mrflight.matching.DictionaryMatcher`.
        sequence: the sequence of the dictionary (for the sidecar; may be ``None``).
        source: the dictionary file (for the sidecar).
        dictionary: the dictionary itself, kept only for matching restricted to a measured B1
            (``b1=`` of :meth:`__call__`); ``None`` frees its atoms once the matcher holds them.
    """

    method = "dictionary matching"

    def __init__(self, matcher, sequence: Sequence | None = None, source=None,
                 dictionary=None) -> None:
        self.matcher = matcher
        self.sequence = sequence
        self.source = None if source is None else str(source)
        self.length = int(matcher.length)
        self.dictionary = dictionary
        self._by_b1: dict[int, object] = {}
        self.b1_restricted = False

    @classmethod
    def from_dictionary(cls, dictionary, *, complex_matching: bool = False, rank=None,
                        device=None, source=None, b1_restricted: bool = False
                        ) -> MatchingReconstructor:
        """Build a matcher from a :class:`mrflight.dictionary.Dictionary` (kept when
        ``b1_restricted``: matching at a measured B1 builds one matcher per B1 value)."""
        from mrflight.matching import DictionaryMatcher

        matcher = DictionaryMatcher(dictionary.atoms, dictionary.params, rank=rank,
                                    complex_matching=complex_matching, device=device)
        seq = dictionary.get_sequence() if hasattr(dictionary, "get_sequence") else None
        return cls(matcher, seq, source, dictionary if b1_restricted else None)

    def b1_values(self) -> np.ndarray:
        """The distinct B1 values of the dictionary (its third column), sorted."""
        params = self.matcher.params
        if params.shape[1] < 3:
            raise ValueError("b1map=FILE restricts matching to the measured B1, which needs a "
                             "dictionary with a B1 column (T1, T2, B1), e.g. one generated with "
                             "b1=...; this dictionary has none")
        return np.unique(params[:, 2].double().cpu().numpy())

    def _matcher_at(self, j: int):
        """The matcher of the atoms whose B1 is the ``j``-th dictionary value (built once)."""
        from mrflight.matching import DictionaryMatcher

        if self.dictionary is None:
            raise ValueError("matching at a measured B1 needs the dictionary: build the "
                             "reconstructor with from_dictionary(..., b1_restricted=True)")
        if j not in self._by_b1:
            b1 = np.asarray(self.dictionary.params, dtype=np.float64)[:, 2]
            sel = np.isclose(b1, self.b1_values()[j], rtol=0.0, atol=1e-6)
            m = self.matcher
            self._by_b1[j] = DictionaryMatcher(
                np.asarray(self.dictionary.atoms)[sel], np.asarray(self.dictionary.params)[sel],
                rank=m.rank, complex_matching=m.complex_matching, device=m.device)
        return self._by_b1[j]

    def __call__(self, signals: np.ndarray, b1: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """``(N, T)`` fingerprints -> (``(N, P)`` T1, T2 in ms[, B1], ``(N,)`` M0), float32
        numpy; B1 where the dictionary has a third (B1) column. With a measured ``b1`` ``(N,)``,
        each voxel is matched only against the atoms at the dictionary's B1 nearest to it."""
        if b1 is None:
            return self._match(self.matcher, signals)
        values = self.b1_values()
        self.b1_restricted = True
        which = np.abs(np.asarray(b1, dtype=np.float64)[:, None] - values[None]).argmin(1)
        params = np.full((len(signals), 3), np.nan, np.float32)
        m0 = np.full(len(signals), np.nan, np.float32)
        for j in np.unique(which):
            sel = which == j
            params[sel], m0[sel] = self._match(self._matcher_at(int(j)), signals[sel])
        return params, m0

    @staticmethod
    def _match(matcher, signals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        params, m0 = matcher.match(_to_torch(signals, matcher.device), return_m0=True)
        return params[:, :3].float().cpu().numpy(), m0.abs().float().cpu().numpy()

    def describe(self) -> dict:
        return {"EstimationMethod": self.method,
                "Dictionary": self.source,
                "DictionaryAtoms": int(self.matcher.n_atoms),
                "MatchingRank": self.matcher.rank,
                "ComplexMatching": bool(self.matcher.complex_matching),
                "B1": ("measured (b1map): matched at the dictionary's nearest B1"
                       if self.b1_restricted else "estimated with T1 and T2"
                       if self.matcher.params.shape[1] > 2 else "not modelled (1)"),
                "M0Method": "least-squares scale of the best-matching atom: <d, s> / <d, d>"}


class NetworkReconstructor:
    """A trained regressor (``predict_parameters``) plus the least-squares M0.

    Args:
        module: an object with ``predict_parameters(signals (N, T)) -> (N, 2)`` T1, T2 in ms
            (the LightningModule from :func:`mrflight.load_checkpoint`).
        sequence: the training sequence (needed for M0 and to check the series length); default
            ``module.hparams["sequence"]`` when present.
        compute_m0: simulate the fingerprint at the predicted T1/T2 to estimate M0 (else M0 NaN).
        source: the checkpoint path (for the sidecar).
    """

    method = "neural network regression"

    def __init__(self, module, sequence: Sequence | None = None, compute_m0: bool = True,
                 source=None) -> None:
        self.module = module
        if sequence is None:
            sequence = checkpoint_sequence(module)
        if sequence is None:
            raise ValueError("the network carries no training sequence (hparams['sequence']); "
                             "pass sequence=... so the series length and M0 can be checked")
        self.sequence = sequence
        self.length = len(sequence)
        self.compute_m0 = bool(compute_m0)
        self.source = None if source is None else str(source)
        if hasattr(module, "eval"):
            module.eval()

    def _device(self):
        dev = getattr(self.module, "device", None)
        if dev is None:
            try:
                dev = next(self.module.parameters()).device
            except (AttributeError, StopIteration):
                dev = torch.device("cpu")
        return dev

    @torch.no_grad()
    def __call__(self, signals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, T)`` fingerprints -> (``(N, P)`` T1, T2 in ms[, B1], ``(N,)`` M0), float32
        numpy; B1 (ratio to nominal) for networks that estimate it."""
        s = _to_torch(signals, self._device())
        pred = self.module.predict_parameters(s)
        pred = torch.as_tensor(pred).detach().float().cpu()[:, :3].clamp_min(0.0)
        pred[~torch.isfinite(pred)] = float("nan")  # an overflowed output is no estimate
        params = pred.numpy()
        if not self.compute_m0:
            return params, np.full(len(params), np.nan, np.float32)
        ok = torch.isfinite(pred).all(1)
        m0 = torch.full((len(pred),), float("nan"))
        if bool(ok.any()):
            b1 = pred[ok, 2] if pred.shape[1] > 2 else None
            sim = simulate(self.sequence, pred[ok, 0], pred[ok, 1], b1)
            m0[ok] = least_squares_m0(s[ok.to(s.device)].cpu(), sim)
        return params, m0.numpy()

    def describe(self) -> dict:
        return {"EstimationMethod": self.method,
                "Checkpoint": self.source,
                "Network": type(_network(self.module)).__name__,
                "M0Method": ("least-squares scale |<d, s>| / <d, d> between the measured "
                             "fingerprint s and the EPG fingerprint d simulated at the predicted "
                             "T1, T2" if self.compute_m0 else "not computed")}


def _network(module):
    """The regressor inside a LightningModule (``.net``), else the module itself."""
    for attr in ("net", "model"):
        inner = getattr(module, attr, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return module
