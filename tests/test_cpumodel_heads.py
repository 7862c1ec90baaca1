"""Heads fitted on frozen features: accuracy on separable data, save/load, metadata, errors."""

import json

import numpy as np
import pytest

from models.heads import class_weights, fit_head, load_head, metadata_path


def blobs(n: int, d: int = 16, seed: int = 0, shift: float = 1.5, pos_fraction: float = 0.5):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pos_fraction).astype(int)
    x = rng.normal(size=(n, d)).astype(np.float32) * 3.0 + 10.0  # unstandardised on purpose
    x[:, 0] += shift * 3.0 * (2 * y - 1)
    x[:, 1] += shift * 3.0 * (2 * y - 1)
    return x, y


def test_logistic_head_separates_and_round_trips(tmp_path):
    x, y = blobs(400)
    xt, yt = blobs(300, seed=1)
    head = fit_head(x, y, kind="logistic", l2=[1e-2, 1e-1, 1.0])
    acc = np.mean((head.predict_proba(xt) > 0.5) == yt)
    assert acc > 0.95
    assert head.info["l2"] in head.info["selection"]["grid"]

    path = head.save(tmp_path / "tier" / "head.pt", {"data_fingerprint": "abc", "split": "train",
                                                      "metrics": {"mcc": 0.9}})
    meta = json.loads(metadata_path(path).read_text())
    assert meta["feature_dim"] == 16 and meta["kind"] == "logistic"
    assert meta["data_fingerprint"] == "abc" and meta["metrics"]["mcc"] == 0.9
    assert meta["class_balance"]["positive"] == int(y.sum())
    again = load_head(path)
    np.testing.assert_allclose(again.predict_proba(xt), head.predict_proba(xt), rtol=1e-6, atol=1e-7)


def test_mlp_head_with_validation_set(tmp_path):
    x, y = blobs(300, seed=2)
    xv, yv = blobs(100, seed=3)
    head = fit_head(x, y, kind="mlp", hidden=16, l2=[1e-3, 1e-2], val=(xv, yv), epochs=60)
    assert head.info["selection"]["on"] == "val"
    assert np.mean((head.predict_proba(xv) > 0.5) == yv) > 0.9
    again = load_head(head.save(tmp_path / "head.pt"))
    np.testing.assert_allclose(again.predict_proba(xv), head.predict_proba(xv), rtol=1e-5, atol=1e-6)


def test_class_balancing_centres_an_imbalanced_prior():
    y = np.array([1] * 10 + [0] * 90)
    w = class_weights(y, balanced=True)
    assert w[y == 1].sum() == pytest.approx(w[y == 0].sum())
    # Uninformative features: a balanced head answers about 0.5, an unbalanced one about 0.1.
    x = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    p_bal = fit_head(x, y, l2=10.0).predict_proba(x).mean()
    p_raw = fit_head(x, y, l2=10.0, class_balanced=False).predict_proba(x).mean()
    assert abs(p_bal - 0.5) < 0.1 and abs(p_raw - 0.1) < 0.05


def test_grouped_selection_and_bad_input():
    x, y = blobs(120, seed=4)
    groups = np.arange(120) // 3  # three rows per "image"
    y = y[groups * 3]
    head = fit_head(x, y, groups=groups, l2=[1e-1, 1.0])
    assert head.info["n_groups"] == 40
    with pytest.raises(ValueError, match="both classes"):
        fit_head(x, np.zeros(120))
    with pytest.raises(ValueError, match="kind"):
        fit_head(x, y, kind="forest")
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        head.predict_proba(np.zeros((2, 5)))


def test_strata_balance_every_dataset_and_class_cell():
    y = np.array([1] * 2 + [0] * 18 + [1] * 30 + [0] * 50)
    strata = np.array(["dashcam"] * 20 + ["web"] * 80)
    w = class_weights(y, balanced=True, strata=strata)
    cells = [w[(strata == s) & (y == c)].sum() for s in ("dashcam", "web") for c in (0, 1)]
    assert np.allclose(cells, cells[0]) and w.mean() == pytest.approx(1.0)
