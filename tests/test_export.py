"""Exported models (ONNX via onnxruntime, TorchScript) give predict_parameters' outputs."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from omegaconf import open_dict

import mrflight
from mrflight.export import export_onnx, export_torchscript
from mrflight.physics import Sequence, simulate
from mrflight.pipeline import compose_config, evaluate, train


def _train(root, *overrides):
    cfg = compose_config(["debug=tiny", "logger=none", "trainer.max_epochs=1",
                          "~callbacks.rich_progress_bar", *overrides], output_dir=root)
    with open_dict(cfg):
        cfg.paths.cache_dir = None
    train(cfg)
    return next((root / "checkpoints").glob("epoch_*.ckpt"))


@pytest.fixture(scope="module")
def gru_ckpt(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("gru"), "model=gru")


def _signals(module, n=7):
    seq = Sequence.from_dict(module.hparams.sequence)
    g = torch.Generator().manual_seed(3)
    t1 = 300 + 2500 * torch.rand(n, generator=g, dtype=torch.float64)
    t2 = 20 + 0.1 * t1 * torch.rand(n, generator=g, dtype=torch.float64)
    x = simulate(seq, t1, t2)
    return x + 0.01 * torch.randn(x.shape, generator=g, dtype=x.dtype) * x.abs().max()


def _close(out, ref):
    assert np.all(np.abs(out - ref) <= 1e-4 * np.abs(ref)), (out, ref)


def test_onnx_matches_predict_parameters_at_any_scale_and_batch(gru_ckpt, tmp_path):
    module = mrflight.load_checkpoint(gru_ckpt)
    path = export_onnx(module, tmp_path / "gru.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _signals(module)
    ref = module.predict_parameters(x).numpy()
    assert ref.shape == (7, 2)
    mag = x.abs().double()
    for scale in (1.0, 1e-30, 1e30):  # float32 range ends: normalised inside, no under/overflow
        out = sess.run(None, {"fingerprints": (mag * scale).float().numpy()})[0]
        _close(out, ref)
    one = sess.run(None, {"fingerprints": mag[:1].float().numpy()})[0]  # another batch size
    _close(one, ref[:1])
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["sequence"] == module.hparams.sequence["name"]
    assert (meta["parameter_names"], meta["units"]) == ("t1,t2", "ms,ms")
    assert int(meta["n_timepoints"]) == module.input_length
    assert json.loads(meta["sequence_json"])["name"] == meta["sequence"]
    zero = sess.run(None, {"fingerprints": np.zeros((1, module.input_length), np.float32)})[0]
    assert np.isnan(zero).all()  # as predict_parameters: an all-zero fingerprint has no answer


def test_torchscript_matches_predict_parameters(gru_ckpt, tmp_path):
    module = mrflight.load_checkpoint(gru_ckpt)
    path = export_torchscript(module, tmp_path / "gru.pt")
    extra = {"metadata.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    x = _signals(module)
    out = loaded(x.abs().float() * 1e-20).numpy()  # outside no_grad: no autograd history
    _close(out, module.predict_parameters(x).numpy())
    assert json.loads(extra["metadata.json"])["units"] == "ms,ms"
    assert any(p.requires_grad for p in module.parameters())  # the exported copy only


def test_complex_input_log_output_model_takes_real_and_imaginary_parts(tmp_path):
    # module.loss=log: the net predicts logarithms, the exported graph applies exp as forward
    ckpt = _train(tmp_path / "run", "model=ann", "data.input_mode=complex", "module.loss=log")
    module = mrflight.load_checkpoint(ckpt)
    assert module.log_output
    sess = ort.InferenceSession(str(export_onnx(module, tmp_path / "ann.onnx")))
    x = _signals(module) * (0.3 - 0.7j)
    inp = torch.stack([x.real, x.imag], dim=1).float().numpy() * 1e25
    assert inp.shape == (7, 2, module.input_length)
    _close(sess.run(None, {"fingerprints": inp})[0], module.predict_parameters(x).numpy())


def test_eval_export_writes_into_the_output_dir(gru_ckpt, tmp_path):
    out = tmp_path / "export"
    cfg = compose_config([f"ckpt_path={gru_ckpt.parent.parent}", "export=onnx"],
                         output_dir=out, config_name="eval")
    files = evaluate(cfg)
    assert files == [out / "gru.onnx"] and files[0].is_file()
    cfg = compose_config([f"ckpt_path={gru_ckpt}", "export=tflite"], output_dir=out,
                         config_name="eval")
    with pytest.raises(ValueError, match="onnx, torchscript"):
        evaluate(cfg)


@pytest.mark.parametrize("model", ["lstm", "gru", "ann", "cnn", "subspace"])
def test_every_default_model_exports(tmp_path, model):
    # untrained default nets (the CNN's adaptive pool is exported as a fixed matrix)
    from hydra.utils import instantiate

    from mrflight.regressor import MRFRegressor

    cfg = compose_config([f"model={model}"], output_dir=tmp_path)
    net = instantiate(cfg.model, input_length=350)
    if not getattr(net, "has_basis", True):  # a subspace basis is fitted when training starts
        net.set_basis(torch.linalg.qr(torch.randn(350, net.rank)).Q)
    module = MRFRegressor(net).eval()
    sess = ort.InferenceSession(str(export_onnx(module, tmp_path / "m.onnx")))
    x = torch.rand(5, 350) + 0.1
    out = sess.run(None, {"fingerprints": x.numpy()})[0]
    ref = module.predict_parameters(x).numpy()
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_onnx_keeps_the_noise_ceiling_of_a_complex_subspace_net(tmp_path):
    """A complex GRU with a basis and a training noise range: inputs beyond the ceiling (read as
    at the top training noise) and inside it give predict_parameters' outputs in ONNX too."""
    from mrflight.models import GRURegressor
    from mrflight.regressor import MRFRegressor
    from mrflight.transforms import preprocess

    torch.manual_seed(2)
    net = GRURegressor(350, 2, 3, hidden_size=8, values_per_step=50, head_sizes=[8], rank=6,
                       head_coordinates=True)
    basis = torch.linalg.qr(torch.randn(350, 6, dtype=torch.float64))[0]
    net.set_basis(basis)
    module = MRFRegressor(net, input_mode="complex", noise_std=[0.005, 0.03],
                          targets=["t1", "t2", "b1"], target_scale_ms=[2000.0, 500.0, 2.0]).eval()
    clean = torch.complex(basis[:, :3].sum(1), basis[:, 3:].sum(1))[None].repeat(6, 1)
    clean = clean / torch.linalg.vector_norm(clean, dim=1, keepdim=True)
    noise = torch.complex(torch.randn(6, 350, dtype=torch.float64),
                          torch.randn(6, 350, dtype=torch.float64))
    stds = torch.tensor([0.002, 0.01, 0.03, 0.06, 0.2, 1.0], dtype=torch.float64)
    x = clean + stds[:, None] * noise
    _, log_out = net.project(preprocess(x, "complex") * net.input_scale, net.input_scale)
    at_ceiling = torch.isclose(log_out, net.log_outside_ceiling.expand_as(log_out))
    assert at_ceiling[3:].all() and not at_ceiling[:3].any()
    sess = ort.InferenceSession(str(export_onnx(module, tmp_path / "gru.onnx")))
    inp = torch.stack([x.real, x.imag], dim=1).float().numpy()
    _close(sess.run(None, {"fingerprints": inp})[0], module.predict_parameters(x).numpy())


def test_export_refuses_two_runs_that_would_write_one_file(gru_ckpt, tmp_path):
    # runs a_b/c and a/b_c both give gru_a_b_c.onnx: the second would replace the first
    import shutil

    from mrflight.export import export_checkpoints

    run = gru_ckpt.parent.parent
    root = tmp_path / "runs"
    shutil.copytree(run, root / "a_b" / "c")
    shutil.copytree(run, root / "a" / "b_c")
    with pytest.raises(ValueError, match=r"gru_a_b_c\.onnx for more than one checkpoint"):
        export_checkpoints(root, "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
