"""Decision heads fitted on frozen backbone features, shared by every backbone+head backend.

Why a head on frozen features: the offline CPU tier (EfficientNet-Lite) and the production
backbone tiers (DINOv2/v3 via transformers) both yield a fixed-length embedding per image; a
small standardised logistic regression (or a one-hidden-layer MLP) on top is cheap to fit on a
few hundred labelled images, hard to overfit with an L2 chosen on held-out data, and its output
is a probability the calibration layer can map further.

On disk a head is two files side by side:
- `head.pt`: a `torch.save` dict of tensors only (loadable with `weights_only=True`):
  `kind` is in the JSON; tensors `mean`, `std` (feature standardisation), and the weights
  (`w`, `b` for logistic; `w1`, `b1`, `w2`, `b2` for the MLP);
- `head.json`: metadata (feature dim, kind, chosen L2, class balance, fit summary, plus whatever
  the trainer adds: data fingerprint, split, held-out metrics, config hash, backend, time).

`HeadMixin` gives a `TrainableTier` the four head methods (`fit_head`, `head_probs`,
`save_head`, `_load_head`) so every backbone backend stores heads the same way.

Licence: project code (no third-party weights here).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from cascade.errors import MissingArtifactError

HEAD_KINDS = ("logistic", "mlp")
DEFAULT_L2_GRID = (1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0, 10.0, 30.0)
FORMAT_VERSION = 1


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


@dataclass
class Head:
    """A fitted head: standardisation + linear (or 1-hidden-layer) map to P(roadwork)."""

    kind: str
    mean: np.ndarray
    std: np.ndarray
    params: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.mean.shape[0])

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(f"head expects features of shape [N, {self.feature_dim}], got {x.shape}")
        z = (x - self.mean) / self.std
        if self.kind == "logistic":
            return z @ self.params["w"] + self.params["b"]
        h = np.maximum(z @ self.params["w1"] + self.params["b1"], 0.0)
        return h @ self.params["w2"] + self.params["b2"]

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """P(roadwork) per row, in [0, 1], float64, never NaN for finite input."""
        return _sigmoid(self.logits(features).astype(np.float64))

    def save(self, path: Path, metadata: Optional[dict[str, Any]] = None) -> Path:
        """Write `path` (tensors) and `head.json` beside it (metadata merged with fit info)."""
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "std": self.std, **self.params}
        state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in tensors.items()}
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        meta = {"format_version": FORMAT_VERSION, "kind": self.kind, "feature_dim": self.feature_dim,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                **self.info, **(metadata or {})}
        json_path = metadata_path(path)
        json_path.write_text(json.dumps(_jsonable(meta), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path


def metadata_path(head_path: Path) -> Path:
    """`head.json` beside `head.pt` (one metadata file per tier directory)."""
    return Path(head_path).with_suffix(".json")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def load_head(path: Path) -> Head:
    """Read a head written by `Head.save`; errors name the file."""
    import torch

    path = Path(path)
    meta_file = metadata_path(path)
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{meta_file}: head metadata missing (expected beside {path.name})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_file}: not valid JSON ({exc})") from None
    kind = meta.get("kind")
    if kind not in HEAD_KINDS:
        raise ValueError(f"{meta_file}: key 'kind': expected one of {HEAD_KINDS}, got {kind!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt: RuntimeError, EOFError, OSError(22), ...
        raise ValueError(f"{path}: cannot read the head tensors ({type(exc).__name__}: "
                         f"{str(exc)[:160]}); the file is truncated or corrupt, train it again") from None
    arrays = {k: v.numpy().astype(np.float32) for k, v in state.items()}
    needed = ("w", "b") if kind == "logistic" else ("w1", "b1", "w2", "b2")
    missing = [k for k in ("mean", "std", *needed) if k not in arrays]
    if missing:
        raise ValueError(f"{path}: tensors {missing} missing for a {kind} head")
    head = Head(kind=kind, mean=arrays.pop("mean"), std=arrays.pop("std"),
                params={k: arrays[k] for k in needed}, info=meta)
    if meta.get("feature_dim") not in (None, head.feature_dim):
        raise ValueError(f"{path}: feature_dim {head.feature_dim} disagrees with {meta_file} "
                         f"({meta.get('feature_dim')})")
    return head


# ---------------------------------------------------------------------------------------------
# fitting


def class_weights(labels: np.ndarray, balanced: bool, strata: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-sample weights that give both classes equal total weight (mean weight 1).

    Balanced weights make the head's probability refer to a 50/50 prior, which is the prior of
    the validators' challenges (labels are drawn 50/50), whatever the training mix was. With
    `strata` (e.g. the dataset of each row) every (stratum, class) cell gets equal total weight,
    so a small dataset's few positives are not drowned by a large one.
    """
    y = np.asarray(labels)
    if not balanced:
        return np.ones(len(y), dtype=np.float32)
    if strata is not None:
        st = np.asarray(strata)
        cells = [(s, c) for s in np.unique(st) for c in (0, 1) if np.any((st == s) & (y == c))]
        w = np.zeros(len(y), dtype=np.float64)
        for s, c in cells:
            m = (st == s) & (y == c)
            w[m] = len(y) / (len(cells) * m.sum())
        return w.astype(np.float32)
    n, n_pos = len(y), int(y.sum())
    n_neg = n - n_pos
    w = np.where(y == 1, n / (2.0 * max(n_pos, 1)), n / (2.0 * max(n_neg, 1)))
    return w.astype(np.float32)


def _grouped_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Stratified group folds: every group (an image and its augmented copies) in one fold."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    uniq = np.unique(groups)
    group_label = {g: int(labels[groups == g].max()) for g in uniq}
    for cls in (0, 1):
        gs = [g for g in uniq if group_label[g] == cls]
        rng.shuffle(gs)
        for i, g in enumerate(gs):
            folds[i % k].append(g)
    return [np.isin(groups, np.array(f)) for f in folds if f]


def _fit_torch(x: np.ndarray, y: np.ndarray, w: np.ndarray, *, kind: str, l2: float, hidden: int,
               seed: int, epochs: int, val: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fit on standardised features; logistic by full-batch L-BFGS, MLP by Adam + early stopping."""
    import torch

    torch.manual_seed(seed)
    xt, yt, wt = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (x, y, w))
    d = xt.shape[1]
    if kind == "logistic":
        wv = torch.zeros(d, requires_grad=True)
        prior = float((w * y).sum() / max(w.sum(), 1e-9))
        bv = torch.tensor(math.log(max(prior, 1e-6) / max(1 - prior, 1e-6)), requires_grad=True)
        opt = torch.optim.LBFGS([wv, bv], lr=1.0, max_iter=max(epochs, 50), history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-6)
        wsum = wt.sum()

        def closure():
            opt.zero_grad()
            z = xt @ wv + bv
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(z, yt, weight=wt,
                                                                         reduction="sum") / wsum
                    + 0.5 * l2 * (wv * wv).sum())
            loss.backward()
            return loss

        opt.step(closure)
        params = {"w": wv.detach().numpy().copy(), "b": np.array([bv.item()], dtype=np.float32)}
        return params, {"epochs": None}

    # MLP: Adam with weight decay = l2, keep the state with the best held-out loss.
    net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=l2)
    gen = torch.Generator().manual_seed(seed)
    best = (float("inf"), None, 0)
    patience, bad = 15, 0
    bs = 256
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(perm), bs):
            idx = perm[i:i + bs]
            opt.zero_grad()
            z = net(xt[idx]).squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, yt[idx], weight=wt[idx])
            loss.backward()
            opt.step()
        if val is None:
            continue
        vx, vy, vw = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in val)
        net.eval()
        with torch.no_grad():
            vl = float(torch.nn.functional.binary_cross_entropy_with_logits(net(vx).squeeze(-1), vy,
                                                                            weight=vw))
        if vl < best[0] - 1e-5:
            best, bad = (vl, {k: v.clone() for k, v in net.state_dict().items()}, epoch + 1), 0
        else:
            bad += 1
            if bad >= patience:
                break
    if best[1] is not None:
        net.load_state_dict(best[1])
    sd = net.state_dict()
    params = {"w1": sd["0.weight"].numpy().T.copy(), "b1": sd["0.bias"].numpy().copy(),
              "w2": sd["2.weight"].numpy()[0].copy(), "b2": sd["2.bias"].numpy().copy()}
    return params, {"epochs": best[2] if best[1] is not None else epochs}


def _weighted_log_loss(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum())


def fit_head(features: np.ndarray, labels: Sequence[int], *, kind: str = "logistic",
             l2: Optional[float | Sequence[float]] = None, class_balanced: bool = True,
             val: Optional[tuple[np.ndarray, Sequence[int]]] = None,
             groups: Optional[Sequence[Any]] = None, strata: Optional[Sequence[Any]] = None,
             hidden: int = 256, folds: int = 3,
             epochs: int = 200, seed: int = 0) -> Head:
    """Fit a head; the L2 strength (and the MLP's stopping epoch) is chosen by held-out loss.

    Held-out data for that choice: `val` when given (then `val`'s own metrics are no longer an
    unbiased estimate), else `folds`-fold cross-validation on the training rows, grouped by
    `groups` so an image and its augmented copies never sit on both sides. `l2` may be one value
    (no search) or a grid; None uses `DEFAULT_L2_GRID` (per-sample-mean loss scale). `strata`:
    balance classes within each stratum (see `class_weights`).
    """
    if kind not in HEAD_KINDS:
        raise ValueError(f"kind: expected one of {HEAD_KINDS}, got {kind!r}")
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.float32)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be [N, D] with N == len(labels); got {x.shape} and {len(y)}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    classes = set(np.unique(y).tolist())
    if classes != {0.0, 1.0}:
        raise ValueError(f"labels must contain both classes 0 and 1; got {sorted(classes)}")
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    if len(g) != len(y):
        raise ValueError("groups must have one entry per row")

    mean = x.mean(0)
    std = np.maximum(x.std(0), 1e-6).astype(np.float32)
    z = (x - mean) / std
    sa = None if strata is None else np.asarray(strata)
    if sa is not None and len(sa) != len(y):
        raise ValueError("strata must have one entry per row")
    w = class_weights(y, class_balanced, sa)
    grid = list(DEFAULT_L2_GRID) if l2 is None else ([float(l2)] if np.isscalar(l2) else list(l2))

    def stdz(a: np.ndarray) -> np.ndarray:
        return (np.asarray(a, dtype=np.float32) - mean) / std

    selection: dict[str, Any] = {"grid": grid}
    scores: list[float] = []
    best_epochs: list[Optional[int]] = []
    if val is not None:
        vx, vy = stdz(val[0]), np.asarray(val[1], dtype=np.float32)
        vw = class_weights(vy, class_balanced)
        selection["on"] = "val"
        for lam in grid:
            params, fi = _fit_torch(z, y, w, kind=kind, l2=lam, hidden=hidden, seed=seed, epochs=epochs,
                                    val=(vx, vy, vw))
            h = Head(kind, mean, std, params)
            scores.append(_weighted_log_loss(h.predict_proba(val[0]), vy, vw))
            best_epochs.append(fi["epochs"])
    else:
        n_groups = len(np.unique(g))
        k = max(2, min(folds, n_groups))
        fold_masks = _grouped_folds(y, g, k, seed)
        selection["on"] = f"{len(fold_masks)}-fold grouped CV"
        for lam in grid:
            losses, eps = [], []
            for held in fold_masks:
                tr = ~held
                if len(np.unique(y[tr])) < 2 or not held.any():
                    continue
                hv = (z[held], y[held], class_weights(y[held], class_balanced,
                                                      None if sa is None else sa[held]))
                params, fi = _fit_torch(z[tr], y[tr], class_weights(y[tr], class_balanced,
                                                                    None if sa is None else sa[tr]), kind=kind,
                                        l2=lam, hidden=hidden, seed=seed, epochs=epochs, val=hv)
                h = Head(kind, np.zeros_like(mean), np.ones_like(std), params)
                losses.append(_weighted_log_loss(h.predict_proba(z[held]), hv[1], hv[2]))
                eps.append(fi["epochs"])
            scores.append(float(np.mean(losses)) if losses else float("inf"))
            best_epochs.append(int(np.median(eps)) if eps and eps[0] is not None else None)
    i = int(np.argmin(scores))
    chosen = grid[i]
    selection["losses"] = scores
    selection["chosen_l2"] = chosen
    if val is not None and kind == "mlp":
        params, _ = _fit_torch(z, y, w, kind=kind, l2=chosen, hidden=hidden, seed=seed, epochs=epochs,
                               val=(vx, vy, vw))
    else:
        final_epochs = best_epochs[i] if kind == "mlp" and best_epochs[i] else epochs
        params, _ = _fit_torch(z, y, w, kind=kind, l2=chosen, hidden=hidden, seed=seed,
                               epochs=final_epochs)
    head = Head(kind=kind, mean=mean.astype(np.float32), std=std, params=params)
    train_p = head.predict_proba(x)
    head.info = {
        "l2": chosen, "selection": selection, "class_balanced": class_balanced,
        "hidden": hidden if kind == "mlp" else None,
        "n_train": int(len(y)), "n_groups": int(len(np.unique(g))),
        "strata": None if sa is None else sorted(map(str, np.unique(sa))),
        "class_balance": {"positive": int(y.sum()), "negative": int(len(y) - y.sum()),
                          "positive_fraction": float(y.mean())},
        "train_log_loss": _weighted_log_loss(train_p, y, w),
    }
    return head


# ---------------------------------------------------------------------------------------------
# the TrainableTier side


class HeadMixin:
    """Head storage for a `TrainableTier` (needs `self.spec`, `self.name`, `fix_command()`).

    Gives the tier the training hooks the `natix-miner train` shell calls: `fit_head`,
    `head_probs`, `save_head`, and `_load_head` for `load()`. Head options (kind, L2) come from
    `self.head_options()` so each backend can expose them in its own `Options`.
    """

    head: Optional[Head] = None

    def head_path(self) -> Path:
        return self.spec.artifact("head.pt")  # type: ignore[attr-defined]

    def head_options(self) -> dict[str, Any]:
        return {}

    def feature_signature(self) -> str:
        """Hash of everything that changes the meaning of a feature vector (subclasses extend)."""
        return hashlib.sha256(json.dumps(self.spec.backend).encode()).hexdigest()[:16]  # type: ignore

    def fit_head(self, features: np.ndarray, labels: Sequence[int], *,
                 groups: Optional[Sequence[Any]] = None, seed: int = 0) -> dict[str, Any]:
        """Fit (and keep in memory) a head on `features`; returns its fit summary."""
        self.head = fit_head(features, labels, groups=groups, seed=seed, **self.head_options())
        return dict(self.head.info)

    def head_probs(self, features: np.ndarray) -> np.ndarray:
        """P(roadwork) from the in-memory head for precomputed features."""
        if self.head is None:
            raise RuntimeError(f"tier {self.name}: no head fitted or loaded")  # type: ignore
        return self.head.predict_proba(features)

    def save_head(self, metadata: dict[str, Any]) -> Path:
        """Write the in-memory head to `head_path()` with `metadata` merged into head.json."""
        if self.head is None:
            raise RuntimeError(f"tier {self.name}: no head fitted to save")  # type: ignore
        meta = {"tier": self.name, "backend": self.spec.backend,  # type: ignore[attr-defined]
                "feature_signature": self.feature_signature(), **metadata}
        return self.head.save(self.head_path(), meta)

    def fix_command(self) -> str:
        return f"natix-miner train --config {self.spec.source} --images DIR"  # type: ignore

    def finetuned_backbone(self) -> Optional[tuple[str, Path, str]]:
        """(kind, path, sha256) of the fine-tuned backbone the loaded head was trained on, checked
        against head.json; None for a head on the pretrained backbone (`models.backbone_weights`)."""
        from models import backbone_weights

        info = self.head.info if self.head is not None else {}
        mode = info.get("mode")
        fix = self.fix_command() + (f" --mode {mode}" if mode in ("finetune", "lora") else "")
        return backbone_weights.resolve(info.get("backbone"), self.spec.artifact(""),  # type: ignore
                                        tier=self.name, fix=fix)  # type: ignore[attr-defined]

    def _load_head(self, expected_dim: Optional[int] = None) -> Head:
        """Read the trained head or raise MissingArtifactError with the command that makes it."""
        path = self.head_path()
        if not path.exists():
            raise MissingArtifactError(f"trained head for tier {self.name} at {path}",  # type: ignore
                                       fix=self.fix_command())
        head = load_head(path)
        sig = head.info.get("feature_signature")
        if sig is not None and sig != self.feature_signature():
            raise MissingArtifactError(
                f"trained head for tier {self.name} at {path} (trained with other feature options; "  # type: ignore
                f"signature {sig} != {self.feature_signature()})", fix=self.fix_command())
        if expected_dim is not None and head.feature_dim != expected_dim:
            raise MissingArtifactError(
                f"trained head for tier {self.name} at {path} (feature dim {head.feature_dim}, "  # type: ignore
                f"backbone gives {expected_dim})", fix=self.fix_command())
        self.head = head
        return head


# ---------------------------------------------------------------------------------------------
# the head as a torch module, for end-to-end fine-tuning


def torch_head(head: Head) -> "Any":
    """A trainable torch module computing the same logits as `head` (standardisation kept fixed).

    Fine-tuning starts from a head fitted on frozen features (or `initial_head`) and trains it with
    the backbone; `head_from_torch` turns it back into a `Head`, so the served file format and
    `Head.predict_proba` never change with the training mode.
    """
    import torch

    class TorchHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kind = head.kind
            self.register_buffer("mean", torch.from_numpy(np.ascontiguousarray(head.mean, np.float32)))
            self.register_buffer("std", torch.from_numpy(np.ascontiguousarray(head.std, np.float32)))
            p = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in head.params.items()}
            if head.kind == "logistic":
                self.w = torch.nn.Parameter(p["w"].clone())
                self.b = torch.nn.Parameter(p["b"].reshape(1).clone())
            else:
                self.w1 = torch.nn.Parameter(p["w1"].clone())
                self.b1 = torch.nn.Parameter(p["b1"].clone())
                self.w2 = torch.nn.Parameter(p["w2"].clone())
                self.b2 = torch.nn.Parameter(p["b2"].reshape(1).clone())

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            z = (features.float() - self.mean) / self.std
            if self.kind == "logistic":
                return z @ self.w + self.b
            return torch.relu(z @ self.w1 + self.b1) @ self.w2 + self.b2

    return TorchHead()


def head_from_torch(module: "Any", info: Optional[dict[str, Any]] = None) -> Head:
    """The `Head` a `torch_head` module now computes (for `Head.save`)."""
    sd = {k: v.detach().float().cpu().numpy().copy() for k, v in module.state_dict().items()}
    needed = ("w", "b") if module.kind == "logistic" else ("w1", "b1", "w2", "b2")
    return Head(kind=module.kind, mean=sd["mean"], std=sd["std"], params={k: sd[k] for k in needed},
                info=dict(info or {}))


def initial_head(dim: int, kind: str = "logistic", hidden: int = 256, seed: int = 0) -> Head:
    """An untrained head (zero logistic weights: p = 0.5 for every image; small random MLP)."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"kind: expected one of {HEAD_KINDS}, got {kind!r}")
    mean, std = np.zeros(dim, np.float32), np.ones(dim, np.float32)
    if kind == "logistic":
        params = {"w": np.zeros(dim, np.float32), "b": np.zeros(1, np.float32)}
    else:
        rng = np.random.default_rng(seed)
        params = {"w1": (rng.normal(0, 1 / math.sqrt(dim), (dim, hidden))).astype(np.float32),
                  "b1": np.zeros(hidden, np.float32), "w2": np.zeros(hidden, np.float32),
                  "b2": np.zeros(1, np.float32)}
    return Head(kind=kind, mean=mean, std=std, params=params, info={"init": "untrained"})
