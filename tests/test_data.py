"""FingerprintDataModule: seeded splits, the noise model, inputs and targets."""

import numpy as np
import pytest
import torch

from mrflight import dictionary
from mrflight.data import Batch, FingerprintDataModule, preprocess
from mrflight.physics import normalize, oksuz2019, simulate

SEQ = oksuz2019(n_pulses=100, lobe_length=20)
PARAMS = dictionary.random_params(400, seed=3)


def make(**kw):
    args = dict(sequence=SEQ, params=PARAMS, n_test=50, batch_size=16, progress=False)
    args.update(kw)
    dm = FingerprintDataModule(**args)
    dm.setup()
    return dm


def test_splits_are_seeded_disjoint_and_sized():
    dm = make(n_train=300, val_fraction=0.1)
    idx = dm.split_indices
    assert (len(idx["train"]), len(idx["val"]), len(idx["test"])) == (270, 30, 50)
    all_idx = torch.cat(list(idx.values())).numpy()
    assert len(np.unique(all_idx)) == len(all_idx)
    again = make(n_train=300, val_fraction=0.1).split_indices
    assert all(torch.equal(idx[k], again[k]) for k in idx)
    other = make(n_train=300, val_fraction=0.1, split_seed=7).split_indices
    assert not torch.equal(idx["test"], other["test"])
    # targets are the parameters of those atoms, scaled by (4000, 500) ms
    b = dm.test_set[0]
    assert isinstance(b, Batch)
    true = torch.as_tensor(PARAMS[idx["test"][0]], dtype=torch.float32)
    assert torch.allclose(b.params_ms, true)
    assert torch.allclose(b.target, true / torch.tensor([4000.0, 500.0]))


def test_unique_pairs_split_as_the_atoms_are():
    """With every T1/T2 pair once (the grids, random params) the split is the atom split."""
    from mrflight.transforms import split_indices

    dm = make(n_train=300, val_fraction=0.1)
    old = split_indices(np.arange(len(PARAMS)), 0, 50, 30, 270)
    assert all(np.array_equal(old[k], dm.split_indices[k].numpy()) for k in old)


@pytest.mark.parametrize("kind", ["b1", "duplicates"])
def test_atoms_sharing_a_t1_t2_pair_never_straddle_splits(tmp_path, kind):
    """A dictionary file with a B1 column (each pair at several B1) or with duplicated rows:
    no test pair is trained on or validated on, under another B1 or as a copy."""
    pairs = PARAMS[:150]
    if kind == "b1":
        b1 = np.array([0.9, 1.0, 1.1])
        p = np.column_stack([np.repeat(pairs, 3, axis=0), np.tile(b1, len(pairs))])
        d = dictionary.generate(SEQ, p[:, :2], b1=p[:, 2], progress=False)
    else:
        d0 = dictionary.generate(SEQ, pairs, progress=False)
        d = dictionary.Dictionary(np.concatenate([d0.atoms, d0.atoms]),
                                  np.concatenate([d0.params, d0.params]),
                                  sequence=SEQ.to_dict())
    path = tmp_path / "d.npz"
    dictionary.save(d, path)
    dm = FingerprintDataModule(sequence=SEQ, path=str(path), n_test=20, batch_size=16,
                               progress=False)
    dm.setup()
    labels = {k: {tuple(x) for x in np.asarray(d.params)[v.numpy(), :2]}
              for k, v in dm.split_indices.items()}
    assert not (labels["test"] & labels["train"]) and not (labels["test"] & labels["val"])
    assert not (labels["val"] & labels["train"])
    assert len(labels["test"]) == 20  # n_test counts pairs; every atom of a pair is in
    copies = 3 if kind == "b1" else 2
    assert len(dm.split_indices["test"]) == 20 * copies
    assert sum(len(v) for v in dm.split_indices.values()) == len(d.atoms)
    # eval.py's matching dictionary (the atoms outside the test split) has no test pair either
    from mrflight.evaluation import Group, build_group_data
    from mrflight.evaluation.settings import EvalSettings

    g = Group(SEQ, "k", [])
    build_group_data(g, {"_target_": "mrflight.data.FingerprintDataModule", "path": str(path),
                         "n_test": 20, "progress": False},
                     EvalSettings(n_test=1000, test_sets=["paper"], phantoms=[]), None)
    assert not ({tuple(x) for x in g.test["paper"][0]}
                & {tuple(x) for x in g.dictionary_params.numpy()})


def test_val_and_test_noise_fixed_per_seed_and_at_the_right_level():
    dm = make(noise_std=0.01)
    again = make(noise_std=0.01)
    assert torch.equal(dm.test_set.signals, again.test_set.signals)
    assert not torch.equal(dm.test_set.signals, make(noise_std=0.01, noise_seed=5).test_set.signals)
    clean = make(noise_std=0.0)
    x, x0 = dm.test_set.signals, clean.test_set.signals
    assert torch.allclose(x.norm(dim=1), torch.ones(len(x)), atol=1e-5)
    # the clean input is the normalised magnitude of the simulated fingerprint
    p = PARAMS[dm.split_indices["test"].numpy()]
    ref = normalize(simulate(SEQ, p[:, 0], p[:, 1]).abs())
    assert torch.allclose(x0, ref.float(), atol=5e-4)  # EPG truncation tolerance
    # magnitude noise of std 0.01 per point (relative to the unit-norm fingerprint)
    rms = (x - x0).pow(2).mean().sqrt().item()
    assert 0.006 < rms < 0.013


def test_training_batches_get_fresh_noise():
    dm = make(noise_std=0.02)
    batch = next(iter(dm.train_dataloader()))
    assert batch.signal.is_complex()
    a = dm.on_after_batch_transfer(batch, 0)
    b = dm.on_after_batch_transfer(batch, 0)
    assert a.signal.dtype == torch.float32 and a.signal.shape == (16, 100)
    assert not torch.equal(a.signal, b.signal)
    assert torch.allclose(a.signal.norm(dim=1), torch.ones(16), atol=1e-5)
    clean = preprocess(batch.signal)
    assert 0.01 < (a.signal - clean).pow(2).mean().sqrt().item() < 0.03
    # validation batches are already inputs and pass unchanged
    v = next(iter(dm.val_dataloader()))
    assert torch.equal(dm.on_after_batch_transfer(v, 0).signal, v.signal)


def test_training_noise_is_fresh_in_every_epoch():
    """Batch i of epoch 1 gets other noise than batch i of epoch 0 (the noise stream is a
    function of (seed, epoch, batch, rank)): the same clean batch at index 0 of two epochs has
    uncorrelated noise residuals (identical ones if the stream ignored the epoch)."""
    dm = make(noise_std=0.02)
    batch = next(iter(dm.train_dataloader()))
    clean = preprocess(batch.signal).double()

    class T:  # what the data module reads from its trainer
        current_epoch, global_rank = 0, 0

    dm.trainer = T()
    res = []
    for epoch in (0, 1, 2):
        T.current_epoch = epoch
        res.append(dm.on_after_batch_transfer(batch, 0).signal.double() - clean)
    assert float(res[0].std()) > 0.01
    for other in res[1:]:
        cos = torch.nn.functional.cosine_similarity(res[0], other, dim=1).abs()
        assert float(cos.median()) < 0.5, cos


def test_complex_input_mode_has_two_channels():
    dm = make(input_mode="complex", noise_std=0.0)
    x = dm.test_set.signals
    assert dm.in_channels == 2 and x.shape == (50, 2, 100)
    assert torch.allclose(x.pow(2).sum(dim=(1, 2)), torch.ones(50), atol=1e-5)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch.signal.shape == (16, 2, 100)


def test_file_source(tmp_path):
    d = dictionary.generate(SEQ, PARAMS[:120], progress=False)
    path = tmp_path / "dict.npz"
    dictionary.save(d, path)
    dm = FingerprintDataModule(sequence=SEQ, path=str(path), n_test=20, batch_size=8)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 120
    bad = FingerprintDataModule(sequence=oksuz2019(n_pulses=50), path=str(path), n_test=20)
    with pytest.raises(ValueError, match="time points"):
        bad.setup()


def test_file_source_with_b1_says_that_b1_is_not_learnt(tmp_path, caplog):
    import logging

    b1 = np.linspace(0.8, 1.2, 120)
    d = dictionary.generate(SEQ, PARAMS[:120], b1=b1, progress=False)
    dictionary.save(d, tmp_path / "dict_b1.npz")
    dm = FingerprintDataModule(sequence=SEQ, path=str(tmp_path / "dict_b1.npz"), n_test=20,
                               batch_size=8)
    with caplog.at_level(logging.WARNING, logger="mrflight"):
        dm.setup()
    assert dm.train_set.params_ms.shape[1] == 2
    assert "B1 column (0.80 to 1.20)" in caplog.text and "data=simulated" in caplog.text


@pytest.mark.parametrize("kw,match", [
    ({"noise_std": -0.1}, "noise_std"),
    ({"batch_size": 0}, "batch_size"),
    ({"n_test": 500}, "only 400"),
    ({"input_mode": "phase"}, "input_mode"),
    ({"params": None}, "exactly one data source"),
])
def test_bad_values_fail_clearly(kw, match):
    args = dict(sequence=SEQ, params=PARAMS, n_test=50)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        FingerprintDataModule(**args)


def test_eval_bound_of_a_b1_dictionary_is_at_its_atoms_b1(tmp_path):
    """A run's dictionary file with a B1 column: eval's bound for its held-out atoms is at
    their B1, unknown (as to the networks and to matching), not at B1 = 1 known, which made
    the RMSE/CRB ratios about 10 % too small."""
    from mrflight.evaluation import Group, build_group_data
    from mrflight.evaluation.protocol import _unit_bound
    from mrflight.evaluation.settings import EvalSettings
    from mrflight.physics import crb

    pairs = PARAMS[:60]
    b1 = np.array([0.8, 1.0, 1.2])
    p = np.column_stack([np.repeat(pairs, 3, axis=0), np.tile(b1, len(pairs))])
    path = tmp_path / "d.npz"
    dictionary.save(dictionary.generate(SEQ, p[:, :2], b1=p[:, 2], progress=False), path)
    settings = EvalSettings(n_test=1000, test_sets=["paper"], phantoms=[])
    g = Group(SEQ, "k", [])
    build_group_data(g, {"_target_": "mrflight.data.FingerprintDataModule", "path": str(path),
                         "n_test": 10, "progress": False}, settings, None)
    params, _ = g.test["paper"]
    atom_b1 = g.test_b1["paper"]
    assert len(atom_b1) == len(params) == 30 and set(np.round(atom_b1, 6)) == {0.8, 1.0, 1.2}
    sel, unit = _unit_bound(g, settings, "paper", 0, params)
    expect = crb(SEQ, torch.from_numpy(params[sel, 0]), torch.from_numpy(params[sel, 1]), 1.0,
                 torch.from_numpy(atom_b1[sel]), estimate_b1=True).numpy()[:, :2]
    np.testing.assert_allclose(unit, expect, rtol=1e-10)
    at_1 = crb(SEQ, torch.from_numpy(params[sel, 0]), torch.from_numpy(params[sel, 1]),
               1.0).numpy()
    assert not np.allclose(unit, at_1, rtol=0.02)
    # without a B1 column nothing changes: the bound at B1 = 1 known
    g2 = Group(SEQ, "k", [])
    build_group_data(g2, None, EvalSettings(n_test=50, test_sets=["paper"], phantoms=[],
                                            grid={"_target_": "mrflight.dictionary.regular_grid",
                                                  "n_t1": 8, "n_t2": 8}), None)
    assert g2.test_b1 == {}


def test_eval_of_a_run_whose_dictionary_file_moved_names_the_runs_config(tmp_path):
    """eval.py reads data.path from the run's saved config: 'data.path=... does not exist:
    point it to ...' named a key eval.py does not have."""
    from mrflight.evaluation import EvalSettings, Group, build_group_data
    from mrflight.evaluation.runs import Run

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    g = Group(SEQ, "k", [Run(ckpt, None)])
    data = {"_target_": "mrflight.data.FingerprintDataModule", "path": str(tmp_path / "d.h5"),
            "n_test": 10, "progress": False}
    with pytest.raises(ValueError, match="d.h5' of the run.* does not exist: eval.py tests .*"
                       "set data.path in .*run/checkpoints/config.yaml"):
        build_group_data(g, data, EvalSettings(n_test=10, test_sets=["paper"], phantoms=[]),
                         None)


def test_training_bound_of_a_b1_dictionary_is_at_its_atoms_b1(tmp_path):
    """The per-sample bound the data module gives the crb loss and the validation RMSE/CRB is,
    for a dictionary file with a B1 column, the one eval uses: at each atom's B1, unknown."""
    from mrflight.physics import crb

    pairs = PARAMS[:40]
    p = np.column_stack([np.repeat(pairs, 3, axis=0), np.tile([0.8, 1.0, 1.2], len(pairs))])
    path = tmp_path / "d.npz"
    dictionary.save(dictionary.generate(SEQ, p[:, :2], b1=p[:, 2], progress=False), path)
    dm = FingerprintDataModule(path=str(path), n_test=5, val_fraction=0.2, noise_std=0.01,
                               progress=False)
    dm.with_bound = True
    dm.setup()
    for name in ("train", "val", "test"):
        ds, idx = getattr(dm, f"{name}_set"), dm.split_indices[name].numpy()
        b1 = torch.from_numpy(p[idx, 2])
        assert ds.params_ms.numpy() == pytest.approx(p[idx, :2])
        expect = crb(SEQ, ds.params_ms[:, 0].double(), ds.params_ms[:, 1].double(), 0.01, b1,
                     estimate_b1=True)[:, :2].float()
        torch.testing.assert_close(ds.bound, expect)
