"""Export a trained regressor for deployment without mrflight: ONNX or TorchScript.

The exported graph takes raw fingerprints at any scale -- ``(N, T)`` float32 magnitudes for a
magnitude-input model, ``(N, 2, T)`` float32 real/imaginary parts for a complex-input model --
does the training preprocessing inside and returns ``(N, P)`` parameters: T1 and T2 in ms, then
B1 as a ratio to nominal where the model estimates it. The preprocessing first divides by the
largest absolute value of each fingerprint, then by its L2 norm, so signals of scale 1e-30 or
1e30 neither underflow nor overflow in float32; an all-zero fingerprint gives NaN.

The file carries its metadata (ONNX ``metadata_props``; TorchScript extra file
``metadata.json``): ``sequence`` (name), ``sequence_json`` (the whole pulse train),
``n_timepoints``, ``input_mode``, ``input_shape``, ``parameter_names``, ``units``, ``model``,
``mrflight_version``.

``python eval.py ckpt_path=CKPT export=onnx`` (or ``export=torchscript``) writes
``<output_dir>/<run>.onnx`` / ``.pt`` for every checkpoint found under ``CKPT``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from mrflight.regressor import outputs_to_params

__all__ = ["Deployable", "export_onnx", "export_torchscript", "export_metadata", "FORMATS",
           "export_checkpoints"]

#: ``export=`` values and their file suffixes
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}

_UNITS = {"t1": "ms", "t2": "ms", "b1": "ratio to nominal", "m0": "a.u."}


class Deployable(nn.Module):
    """A trained :class:`mrflight.regressor.MRFRegressor` with its preprocessing, as one graph.

    Args:
        module: the trained module (``mrflight.load_checkpoint(path)``).

    Shapes:
        input: ``(N, T)`` float32 magnitudes (``input_mode="magnitude"``) or ``(N, 2, T)``
        float32 real/imaginary parts (``input_mode="complex"``), any scale.
        output: ``(N, P)`` float32, ``P = len(parameter_names)`` (T1, T2 in ms, then B1).
    """

    def __init__(self, module) -> None:
        super().__init__()
        # the network and the output map of MRFRegressor.forward (MRFRegressor.to_params), not
        # the LightningModule itself, whose trainer-bound properties break tracing
        self.net = module.net.eval()
        self.register_buffer("target_scale", module.target_scale.detach().clone().float())
        self.log_output = bool(module.log_output)
        self.complex_input = module.hparams.get("input_mode", "magnitude") == "complex"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if not self.complex_input:
            x = x.abs()
        dims = [1, 2] if self.complex_input else [1]
        scale = torch.amax(x.abs(), dim=dims, keepdim=True)
        x = x / torch.where(scale > 0, scale, torch.ones_like(scale))
        norm = torch.sqrt(torch.sum(x * x, dim=dims, keepdim=True))
        ok = norm.reshape(-1, 1) > 0
        x = x / torch.where(norm > 0, norm, torch.ones_like(norm))
        if self.complex_input:
            x = _align_phase_channels(x)
        out = outputs_to_params(self.net(x), self.target_scale, self.log_output)
        return torch.where(ok, out, torch.full_like(out, float("nan")))  # all-zero: NaN


def _align_phase_channels(x: torch.Tensor) -> torch.Tensor:
    """:func:`mrflight.transforms.align_phase` on ``(N, 2, T)`` real/imaginary channels,
    in real arithmetic (ONNX has no complex type): the phase ``phi`` of ``sum_t x_t^2 = a + ib``
    by the half-angle formulas, a rotation by ``-phi``, then the sign that makes
    ``sum_t Re(x_t) |Re(x_t)| >= 0``."""
    re, im = x[:, 0], x[:, 1]
    a = torch.sum(re * re - im * im, dim=1, keepdim=True)
    b = 2.0 * torch.sum(re * im, dim=1, keepdim=True)
    r = torch.sqrt(a * a + b * b)
    c2 = torch.where(r > 0, a / torch.where(r > 0, r, torch.ones_like(r)), torch.ones_like(r))
    cos = torch.sqrt(torch.clamp(0.5 * (1.0 + c2), min=0.0))
    sin = torch.sqrt(torch.clamp(0.5 * (1.0 - c2), min=0.0))
    sin = torch.where(b < 0, -sin, sin)
    re2 = re * cos + im * sin
    im2 = im * cos - re * sin
    sign = torch.where(torch.sum(re2 * torch.abs(re2), dim=1, keepdim=True) < 0,
                       -torch.ones_like(a), torch.ones_like(a))
    return torch.stack([re2 * sign, im2 * sign], dim=1)


def parameter_names(module) -> list[str]:
    """The module's output parameters (``hparams["targets"]``, default ``["t1", "t2"]``)."""
    return [str(p) for p in (module.hparams.get("targets") or ("t1", "t2"))]


def export_metadata(module) -> dict[str, str]:
    """String metadata of an exported model (see the module docstring)."""
    import mrflight

    seq = module.hparams.get("sequence") or {}
    names = parameter_names(module)
    complex_input = module.hparams.get("input_mode", "magnitude") == "complex"
    T = int(module.input_length)
    return {
        "sequence": str(seq.get("name", "unknown")),
        "sequence_json": json.dumps(seq, default=lambda o: getattr(o, "tolist", str)(o)),
        "n_timepoints": str(T),
        "input_mode": "complex" if complex_input else "magnitude",
        "input_shape": f"(N, 2, {T}) float32 real/imaginary" if complex_input
        else f"(N, {T}) float32 magnitude",
        "input_scale": "any: normalised inside (max-abs, then L2)",
        "parameter_names": ",".join(names),
        "units": ",".join(_UNITS.get(n.lower(), "") for n in names),
        "output_shape": f"(N, {len(names)}) float32",
        "model": type(module.net).__name__,
        "mrflight_version": mrflight.__version__,
    }


def _example(module, n: int = 2) -> torch.Tensor:
    T = int(module.input_length)
    g = torch.Generator().manual_seed(0)
    if module.hparams.get("input_mode", "magnitude") == "complex":
        return torch.randn(n, 2, T, generator=g)
    return torch.rand(n, T, generator=g)


class _PoolAsMatmul(nn.Module):
    """``nn.AdaptiveAvgPool1d`` at a known input length as a product with a constant matrix
    (ONNX has no adaptive pooling whose output size does not divide the input size)."""

    def __init__(self, length_in: int, length_out: int) -> None:
        super().__init__()
        w = torch.zeros(length_in, length_out)
        for j in range(length_out):  # PyTorch's adaptive windows
            lo = (j * length_in) // length_out
            hi = -((-(j + 1) * length_in) // length_out)
            w[lo:hi, j] = 1.0 / (hi - lo)
        self.register_buffer("weight", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def _cpu_copy(module):
    """A CPU copy in eval mode whose adaptive pools are fixed for the module's input length."""
    import copy

    module = copy.deepcopy(module).cpu().eval()
    lengths: dict[str, int] = {}
    pools = {name: m for name, m in module.net.named_modules()
             if isinstance(m, nn.AdaptiveAvgPool1d)}
    hooks = [m.register_forward_pre_hook(
        lambda _, inp, name=name: lengths.__setitem__(name, inp[0].shape[-1]))
        for name, m in pools.items()]
    try:
        with torch.no_grad():
            Deployable(module)(_example(module))
    finally:
        for h in hooks:
            h.remove()
    for name, m in pools.items():
        size = m.output_size if isinstance(m.output_size, int) else m.output_size[0]
        parent_name, _, attr = name.rpartition(".")
        parent = module.net.get_submodule(parent_name) if parent_name else module.net
        setattr(parent, attr, _PoolAsMatmul(lengths[name], int(size)))
    return module


def export_onnx(module, path, opset: int = 17) -> Path:
    """Write ``module`` (with its preprocessing) as an ONNX file with metadata.

    Args:
        module: a trained :class:`mrflight.regressor.MRFRegressor`.
        path: the ``.onnx`` file to write (atomically).
        opset: ONNX opset version.

    Returns:
        The path written. Input ``"fingerprints"``, output ``"parameters"``, batch axis dynamic.
    """
    import onnx

    from mrflight.fileio import atomic_path

    module = _cpu_copy(module)
    graph = Deployable(module).eval()
    path = Path(path)
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # the recurrent nets start from a zero state: any batch size is safe (tested)
        warnings.filterwarnings("ignore", message=".*with a batch_size other than 1.*")
        # the nets check their input shape in Python: constant for a fixed T, as intended
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # chosen on purpose: the torch.export-based exporter needs onnxscript
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        torch.onnx.export(graph, (_example(module),), str(tmp), dynamo=False,
                          input_names=["fingerprints"], output_names=["parameters"],
                          dynamic_axes={"fingerprints": {0: "N"}, "parameters": {0: "N"}},
                          opset_version=opset)
        model = onnx.load(str(tmp))
        for k, v in export_metadata(module).items():
            model.metadata_props.add(key=k, value=v)
        model.doc_string = ("mrflight regressor: raw fingerprints at any scale -> "
                            + export_metadata(module)["parameter_names"])
        onnx.save(model, str(tmp))
    return path


def export_torchscript(module, path) -> Path:
    """Write ``module`` (with its preprocessing) as a traced TorchScript file.

    Load with ``torch.jit.load(path, _extra_files={"metadata.json": ""})`` (no mrflight needed);
    the metadata is the JSON in that extra file.
    """
    from mrflight.fileio import atomic_path

    module = _cpu_copy(module)
    graph = Deployable(module).eval().requires_grad_(False)  # outputs without autograd history
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated")
        traced = torch.jit.trace(graph, (_example(module),), check_trace=False)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated")
        torch.jit.save(traced, str(tmp),
                       _extra_files={"metadata.json": json.dumps(export_metadata(module))})
    return path


def export_checkpoints(ckpt_path, fmt: str, out_dir) -> list[Path]:
    """Export every checkpoint found under ``ckpt_path`` (a ``.ckpt``, a run or a multirun
    directory) in format ``fmt`` (``onnx`` or ``torchscript``) into ``out_dir``."""
    import mrflight
    from mrflight.checkpoints import find_checkpoints, run_dir_of

    if fmt not in FORMATS:
        raise ValueError(f"export={fmt!r}: choose one of {', '.join(FORMATS)}")
    if not ckpt_path:
        raise ValueError("export needs a trained model: add ckpt_path=CHECKPOINT_OR_RUN_DIR")
    root = Path(str(ckpt_path)).expanduser()
    out_dir = Path(out_dir)
    jobs = []
    for ck in find_checkpoints(root):
        module = mrflight.load_checkpoint(str(ck))
        run = run_dir_of(ck)
        rel = run.relative_to(root) if run.is_relative_to(root) else Path(run.name)
        stem = "_".join([type(module.net).__name__.removesuffix("Regressor").lower(),
                         *rel.parts])
        jobs.append((module, out_dir / f"{stem}{FORMATS[fmt]}"))
    dests = [dest for _, dest in jobs]
    twice = sorted({str(d) for d in dests if dests.count(d) > 1})
    if twice:  # run folders whose names join to the same stem: one export would replace another
        raise ValueError(f"export would write {', '.join(twice)} for more than one checkpoint "
                         f"under {root}: export those runs one at a time (ckpt_path=RUN)")
    there = [str(dest) for _, dest in jobs if dest.exists()]
    if there:
        raise ValueError(f"export would overwrite {', '.join(there)}: give another "
                         "paths.output_dir (each eval.py run gets a new one by default)")
    fn = export_onnx if fmt == "onnx" else export_torchscript
    return [fn(module, dest) for module, dest in jobs]
