"""Weight-free hazard-colour cues: traffic orange, red/white and yellow/black stripes.

Origin: written for this project; numpy + PIL + scipy only, no weights, no licence beyond the
project's. Why it exists: work zones are marked with a small, regulated palette (RAL 2009 traffic
orange cones and barrels, red/white striped beacons, barrier boards and chevrons, yellow/black
hazard stripes, yellow temporary lane markings in Germany). Colour and stripe layout are cheap to
measure, survive JPEG and resizing better than small text, and give the cascade an independent
opinion from the CNN tiers. On their own they are weak (autumn leaves, brick, red cars and
red-bordered permanent signs trigger them too); their value is as one more vote, and as features
for a fitted logistic head.

How a probability is made: the image is reduced by an integer factor to about `work_side` px
(a box filter: cheap, and it keeps thin stripes' colour), converted to HSV, and colour masks are
built. From them come the cues of `CUE_NAMES` (shares, largest blob, blob counts, stripe
alternations along rows and columns, where the colour sits vertically). Each cue is squashed
(`sqrt` of shares, `log1p` of counts) so that a linear model over them is sensible, then:

    p = sigmoid(bias + sum_i coefficient_i * cue_i)

with hand-set coefficients (`HazardDefaults`, overridable under the tier's YAML `options:`), or
with a fitted head when one exists: `<artifacts>/<tier>/head.pt`, fitted by `natix-miner train`
over `embed` (format of `models.heads`). The tier works untrained: a missing head is not an error.
`scripts/eval_cues.py --fit` prints a fitted head's coefficients on the cue scale, ready to paste
into `options.coefficients` / `options.bias`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
from loguru import logger
from PIL import Image
from scipy import ndimage

from cascade.config import TierSpec
from cascade.errors import ConfigError, MissingArtifactError
from cascade.tier import TierOutput, TrainableTier
from models.heads import HeadMixin

# Bumped whenever the cue code changes meaning, so fitted heads of older cues are not reused.
FEATURE_VERSION = 2

# Order of the cue vector `embed` returns (and of the fitted head's inputs).
CUE_NAMES: tuple[str, ...] = (
    "orange_share",          # sqrt(share of traffic-orange pixels): cones, barrels, signs, vests
    "orange_blob",           # sqrt(largest orange blob share): one big cone/sign vs scattered speckle
    "orange_blobs",          # log1p(orange blobs >= min_blob_px): cones come in rows
    "orange_low",            # share of orange pixels in the lower part (road), 0 when none
    "red_white_adjacent",    # sqrt(share of red pixels touching white and vice versa): stripes, boards
    "red_white_stripes",     # sqrt(share of rows+cols with >= k red<->white alternations): periodicity
    "red_white_objects",     # log1p(objects made of >= 3 separate red stripes touching white)
    "yellow_black_adjacent", # sqrt(share of yellow touching black and vice versa): hazard stripes
    "yellow_black_stripes",  # sqrt(share of rows+cols with >= k yellow<->black alternations)
    "yellow_road",           # sqrt(share of yellow in the lower half): temporary lane markings, machines
    "red_share",             # sqrt(share of red): red cars, brick, brake lights; a confounder to discount
    "colourful",             # sqrt(share of strongly saturated pixels): sunsets, autumn, ads; discount
)


@dataclass(frozen=True)
class HazardDefaults:
    """Hand-set logistic coefficients over `CUE_NAMES`, and why each has its sign and size.

    Set by reasoning about what each cue means, then checked against a regularised logistic fit
    on the training splits of the dev data (dashcam + web photos, cone close-ups left out) for
    sign and rough size; where the data contradicted an intuition the cue was set to 0 rather
    than to the fitted value (small data, photo-style confounds). A fitted head replaces them.
    The bias puts a frame with no hazard colour at p ~ 0.08 and a typical dashcam street frame
    (a few red-ringed signs, a red car) near 0.4: absence of colour is only weak evidence.
    """

    bias: float = -2.5
    coefficients: tuple[tuple[str, float], ...] = (
        ("orange_share", 2.0),          # cone/barrel orange: sqrt share 0.15 (2 %) -> +0.3
        ("orange_blob", 3.0),           # one compact orange object beats scattered speckle
        ("orange_blobs", 0.4),          # several orange objects: a row of cones (3 -> +0.55)
        ("orange_low", 0.8),            # cones stand on the road; sunset/autumn orange is high up
        ("red_white_adjacent", 3.0),    # red right next to white: barriers, beacons, boards
        ("red_white_stripes", 4.0),     # repeated red/white alternation along rows or columns
        ("red_white_objects", 0.4),     # objects of >= 3 red stripes: beacons (Leitbaken), boards
        ("yellow_black_adjacent", 0.5), # hazard stripes and chevrons; also foliage shade: small
        ("yellow_black_stripes", 0.5),
        ("yellow_road", 0.5),           # German temporary markings are yellow, US centre lines too
        ("red_share", 0.0),             # red alone is ambiguous (cars, brick vs cones in shade)
        ("colourful", 0.0),             # kept for fitted heads (photo-style confound), neutral here
    )

    def as_dict(self) -> dict[str, float]:
        return dict(self.coefficients)


DEFAULTS = HazardDefaults()


@dataclass(frozen=True)
class ColourThresholds:
    """HSV bounds in PIL units (H, S, V in 0..255; hue degrees x 255/360)."""

    orange_hue: tuple[int, int] = (6, 20)      # ~8..28 degrees: RAL 2009 traffic orange and kin
    orange_min_s: int = 140
    orange_min_v: int = 110
    red_hue_low: int = 6                       # red wraps around 0: [0, 6] or [243, 255]
    red_hue_high: int = 243
    red_min_s: int = 90                        # loose: beacons in shade on dashcam frames are
    red_min_v: int = 35                        # dark red (V ~ 50) beside bluish-grey white
    white_max_s: int = 70                      # (S ~ 60, V ~ 110); stricter bounds miss them
    white_min_v: int = 100
    yellow_hue: tuple[int, int] = (28, 46)     # ~40..65 degrees
    yellow_min_s: int = 110
    yellow_min_v: int = 110
    black_max_v: int = 70
    colourful_min_s: int = 170
    colourful_min_v: int = 90


@dataclass(frozen=True)
class HazardCueOptions:
    """Options of the hazard-cue tier (YAML `options:`)."""

    # About the longest side the image is reduced to (by an integer factor) before measuring.
    work_side: int = 640
    # Pixels (at work size) a colour may be from another to count as touching.
    touch_px: int = 2
    # Largest gap (px) of other colours bridged when counting stripe alternations along a line.
    stripe_gap_px: int = 3
    # Alternations along one row or column that make it a "striped" line.
    stripe_min_alternations: int = 4
    # Smallest blob (px at work size) counted as an object.
    min_blob_px: int = 12
    # Separate red stripes one red/white object needs to count as a striped beacon or board.
    min_stripes: int = 3
    # Half the widest stripe (px at work size) that still joins its neighbours into one object.
    stripe_fill_px: int = 6
    # Part of the image (from the top, 0..1) below which pixels count as "lower" (road).
    lower_from: float = 0.45
    # Override hand-set coefficients by cue name (see `CUE_NAMES`); others keep their defaults.
    coefficients: dict[str, float] = field(default_factory=dict)
    # Override the hand-set bias.
    bias: Optional[float] = None
    # Use a fitted head (head.pt or coefficients.json under the tier's artefacts) when present.
    use_fitted: bool = True

    def validate(self, source: str, prefix: str) -> None:
        unknown = sorted(set(self.coefficients) - set(CUE_NAMES))
        if unknown:
            raise ConfigError(source, f"{prefix}.coefficients.{unknown[0]}", f"one of {list(CUE_NAMES)}")
        if self.work_side < 32:
            raise ConfigError(source, f"{prefix}.work_side", "an integer >= 32", self.work_side)
        if not 0.0 <= self.lower_from < 1.0:
            raise ConfigError(source, f"{prefix}.lower_from", "a number in [0, 1)", self.lower_from)
        for name in ("touch_px", "stripe_gap_px", "stripe_min_alternations", "min_blob_px", "min_stripes",
                     "stripe_fill_px"):
            if getattr(self, name) < 1:
                raise ConfigError(source, f"{prefix}.{name}", "an integer >= 1", getattr(self, name))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Square dilation by `r` px with slicing (faster than ndimage for a radius of 1-3)."""
    out = mask.copy()
    h, w = mask.shape
    for d in range(1, r + 1):
        if d < h:
            out[d:, :] |= mask[:-d, :]
            out[:-d, :] |= mask[d:, :]
    tmp = out.copy()
    for d in range(1, r + 1):
        if d < w:
            out[:, d:] |= tmp[:, :-d]
            out[:, :-d] |= tmp[:, d:]
    return out


def _alternation_lines(a: np.ndarray, b: np.ndarray, gap: int, k: int) -> float:
    """Share of rows plus columns with at least `k` a<->b alternations (gaps <= `gap` px bridged).

    Why: a striped beacon or barrier board alternates red/white (or yellow/black) many times along
    a line through it; a red-ringed sign alternates at most about four times, a red car not at all.
    """
    lab = a.astype(np.int8) + 2 * (b & ~a).astype(np.int8)
    h, w = lab.shape
    total = 0
    for grid, n_lines, length in ((lab, h, w), (np.ascontiguousarray(lab.T), w, h)):
        idx = np.flatnonzero(grid)
        if idx.size < 2:
            continue
        vals = grid.ravel()[idx]
        line = idx // length
        pos = idx - line * length
        change = ((vals[1:] != vals[:-1]) & (line[1:] == line[:-1])
                  & (pos[1:] - pos[:-1] <= gap + 1))
        counts = np.bincount(line[1:][change], minlength=n_lines)
        total += int(np.count_nonzero(counts >= k))
    return total / float(h + w)


def _blobs(mask: np.ndarray, min_px: int) -> tuple[int, int]:
    """(number of 8-connected blobs >= min_px, size of the largest blob)."""
    if not mask.any():
        return 0, 0
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel())[1:]
    return int(np.count_nonzero(sizes >= min_px)), int(sizes.max()) if sizes.size else 0


def _striped_objects(zone: np.ndarray, colour: np.ndarray, min_stripes: int) -> int:
    """Objects of `zone` (two colours touching) that hold >= `min_stripes` separate `colour` blobs.

    Why: a beacon, a barrier board or a hazard-striped panel is one object made of several
    separate red (or yellow) stripes; a red-ringed traffic sign or a red car is one red blob.
    """
    if not zone.any():
        return 0
    eight = np.ones((3, 3), dtype=bool)
    zone_lab, n_zone = ndimage.label(zone, structure=eight)
    stripes = colour & zone
    four = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)  # diagonal stripes stay apart
    stripe_lab, n_stripes = ndimage.label(stripes, structure=four)
    if n_stripes < min_stripes:
        return 0
    pairs = np.unique(zone_lab[stripes].astype(np.int64) * (n_stripes + 1) + stripe_lab[stripes])
    per_zone = np.bincount(pairs // (n_stripes + 1), minlength=n_zone + 1)
    return int(np.count_nonzero(per_zone[1:] >= min_stripes))


def measure_cues(image: Image.Image, options: HazardCueOptions,
                 thresholds: ColourThresholds = ColourThresholds()) -> dict[str, float]:
    """Raw cue values (shares in [0,1], counts) of one RGB image, before squashing."""
    im = image if image.mode == "RGB" else image.convert("RGB")
    w, h = im.size
    if w < 1 or h < 1:
        raise ValueError(f"empty image {w}x{h}")
    factor = int(round(max(w, h) / float(options.work_side)))
    if factor >= 2:  # box-filter reduction: several times cheaper than a resampling resize
        im = im.reduce(factor)
    hsv = np.asarray(im.convert("HSV"))
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    t = thresholds
    orange = ((hue >= t.orange_hue[0]) & (hue <= t.orange_hue[1])
              & (sat >= t.orange_min_s) & (val >= t.orange_min_v))
    red = (((hue <= t.red_hue_low) | (hue >= t.red_hue_high)) & (sat >= t.red_min_s) & (val >= t.red_min_v))
    white = (sat <= t.white_max_s) & (val >= t.white_min_v)
    yellow = ((hue >= t.yellow_hue[0]) & (hue <= t.yellow_hue[1])
              & (sat >= t.yellow_min_s) & (val >= t.yellow_min_v))
    black = val <= t.black_max_v
    colourful = (sat >= t.colourful_min_s) & (val >= t.colourful_min_v)

    hh, ww = orange.shape
    n = float(hh * ww)
    low_row = min(hh - 1, int(hh * options.lower_from))
    r = options.touch_px
    # Stripes: red touching white counts on both sides of the edge; traffic red drifts towards
    # orange in sunlight, so orange counts as red here.
    redish = red | orange
    rw = (redish & _dilate(white, r)) | (white & _dilate(redish, r))
    yb = (yellow & _dilate(black, r)) | (black & _dilate(yellow, r))
    n_orange = float(orange.sum())
    orange_blobs, orange_largest = _blobs(orange, options.min_blob_px)
    # An object's zone: the touching band widened to cover whole stripes up to 2 x fill px wide.
    rw_zone = _dilate(rw, options.stripe_fill_px) & (redish | white)
    rw_objects = _striped_objects(rw_zone, redish, options.min_stripes)
    lower = slice(low_row, hh)
    return {
        "orange_share": n_orange / n,
        "orange_blob": orange_largest / n,
        "orange_blobs": float(orange_blobs),
        "orange_low": float(orange[lower].sum()) / n_orange if n_orange else 0.0,
        "red_white_adjacent": float(rw.sum()) / n,
        "red_white_stripes": _alternation_lines(redish, white, options.stripe_gap_px,
                                                options.stripe_min_alternations),
        "red_white_objects": float(rw_objects),
        "yellow_black_adjacent": float(yb.sum()) / n,
        "yellow_black_stripes": _alternation_lines(yellow, black, options.stripe_gap_px,
                                                   options.stripe_min_alternations),
        "yellow_road": float(yellow[lower].sum()) / max(1.0, float((hh - low_row) * ww)),
        "red_share": float(red.sum()) / n,
        "colourful": float(colourful.sum()) / n,
    }


_COUNT_CUES = {"orange_blobs", "red_white_objects"}
_LINEAR_CUES = {"orange_low"}


def squash(raw: dict[str, float]) -> np.ndarray:
    """The cue vector in `CUE_NAMES` order: sqrt of shares, log1p of counts (linear-model friendly)."""
    out = np.empty(len(CUE_NAMES), dtype=np.float32)
    for i, name in enumerate(CUE_NAMES):
        v = max(0.0, float(raw[name]))
        out[i] = math.log1p(v) if name in _COUNT_CUES else (v if name in _LINEAR_CUES else math.sqrt(v))
    return out


class _LinearCues:
    """p = sigmoid(bias + w . cues): the hand-set model (with any YAML overrides)."""

    def __init__(self, bias: float, coefficients: dict[str, float], source: str) -> None:
        self.bias = float(bias)
        self.weights = np.array([float(coefficients.get(n, 0.0)) for n in CUE_NAMES], dtype=np.float64)
        self.source = source

    def predict(self, x: np.ndarray) -> tuple[float, dict[str, float]]:
        contrib = self.weights * x.astype(np.float64)
        z = self.bias + float(contrib.sum())
        return _sigmoid(z), {n: round(float(c), 4) for n, c in zip(CUE_NAMES, contrib)}


class HazardCueTier(HeadMixin, TrainableTier):
    """Hazard colours and stripes -> probability; hand-set logistic, or a fitted head if present."""

    Options = HazardCueOptions

    def __init__(self, spec: TierSpec) -> None:
        super().__init__(spec)
        coefs = {**DEFAULTS.as_dict(), **self.options.coefficients}
        bias = DEFAULTS.bias if self.options.bias is None else self.options.bias
        self._hand = _LinearCues(bias, coefs, source="hand-set")
        self.head = None

    # lifecycle ---------------------------------------------------------------------------------
    def load_backbone(self, device: str) -> None:
        """Nothing to load: the cues need no weights."""
        self.device = device

    def load(self, device: str) -> None:
        """Use the fitted head when one was trained for these cue options, else the hand-set model.

        Unlike backbone tiers, a missing head is not an error: the hand-set coefficients are a
        working model. A head trained with other cue options is ignored with a warning; a
        corrupt head file raises (the operator should see it).
        """
        self.load_backbone(device)
        self.head = None
        if not self.options.use_fitted or not self.head_path().exists():
            return
        try:
            self._load_head(expected_dim=len(CUE_NAMES))
            logger.info("{}: using fitted head {}", self.name, self.head_path())
        except MissingArtifactError as exc:
            logger.warning("{}: {}; using hand-set coefficients", self.name, exc)
            self.head = None

    def feature_signature(self) -> str:
        o = self.options
        key = [self.spec.backend, FEATURE_VERSION, list(CUE_NAMES),
               dataclasses.asdict(ColourThresholds()), o.work_side, o.touch_px, o.stripe_gap_px,
               o.stripe_min_alternations, o.min_blob_px, o.min_stripes, o.stripe_fill_px, o.lower_from]
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    # features ----------------------------------------------------------------------------------
    def cues(self, image: Image.Image) -> tuple[np.ndarray, dict[str, float]]:
        raw = measure_cues(image, self.options)
        return squash(raw), raw

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """[N, len(CUE_NAMES)] squashed cue vectors (deterministic; what a fitted head consumes)."""
        if not images:
            return np.zeros((0, len(CUE_NAMES)), dtype=np.float32)
        return np.stack([self.cues(im)[0] for im in images])

    def feature_names(self) -> list[str]:
        return list(CUE_NAMES)

    # inference ---------------------------------------------------------------------------------
    def predict(self, images: Sequence[Image.Image]) -> list[TierOutput | Exception]:
        results: list[TierOutput | Exception] = []
        head = self.head
        for image in images:
            try:
                x, raw = self.cues(image)
                evidence: dict[str, Any] = {"cues": {k: round(v, 5) for k, v in raw.items()},
                                            "features": [round(float(v), 5) for v in x]}
                if head is not None:
                    p = float(head.predict_proba(x[None, :])[0])
                    evidence["model"] = "fitted head"
                else:
                    p, contrib = self._hand.predict(x)
                    evidence["model"] = "hand-set"
                    evidence["contributions"] = contrib
                if not math.isfinite(p):
                    raise ValueError(f"non-finite probability {p}")
                results.append(TierOutput(prob=min(1.0, max(0.0, p)), evidence=evidence))
            except Exception as exc:  # one bad image never fails the batch
                results.append(exc)
        return results

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        # No weights; naming the cue code's signature here keys feature caches (natix-miner train).
        info["weights"] = f"none (weight-free cues, signature {self.feature_signature()})"
        info["model"] = str(self.head_path()) if self.head is not None else "hand-set"
        return info
