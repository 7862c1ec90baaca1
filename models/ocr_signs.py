"""OCR of work-zone sign text with RapidOCR's bundled PP-OCR models (onnxruntime, CPU).

Origin and licence: `rapidocr-onnxruntime` (Apache-2.0) ships PaddleOCR's PP-OCRv4 text detector
(`ch_PP-OCRv4_det_infer.onnx`, ~4.7 MB) and recogniser (`ch_PP-OCRv4_rec_infer.onnx`, ~10.8 MB),
both Apache-2.0, inside the pip package: nothing is downloaded. The recogniser reads Latin capitals
and digits well although it is the Chinese+English model.

Why it exists: a sign that says ROAD WORK AHEAD, ROAD CLOSED, DETOUR or BAUSTELLE is the most
explicit evidence of a work zone there is, and it is evidence the CNN tiers see only as a few
pixels of texture. OCR is strong when text is read and weak when it is not: most roadwork photos
carry no readable text (a dashcam sign is ~50 px wide), so absence of text maps to a prior below
0.5 but not far below (`prior_no_text`), while a confident match maps up to `max_prob`.

Matching is spelling-tolerant: texts are upper-cased, umlauts folded (Ä->AE, ß->SS), look-alike
digits mapped (0->O, 1->I, 5->S), spaces dropped (PP-OCR often merges or splits words), and each
phrase is searched as an approximate substring (optimal-string-alignment edit distance, so a
transposition such as RAOD counts as one error) of each box's text and of runs of up to three
consecutive boxes in reading order (a sign's lines are separate boxes).

The tier is deliberately not a `TrainableTier`: the dev data hold almost no readable sign text,
so a head fitted over OCR features learns photo style (how much text a photo has) instead of
sign reading, and `natix-miner train` would spend tens of CPU minutes OCR-ing augmented copies
for it. The hand-set mapping is the model; the calibration layer maps its output further.
The feature vector (`FEATURE_NAMES`) is still reported in the evidence for analysis.
"""

from __future__ import annotations

import math
import threading
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
from loguru import logger
from PIL import Image

from cascade.config import TierSpec
from cascade.errors import ConfigError
from cascade.tier import Tier, TierOutput

# Phrase -> strength in (0, 1]: how sure a perfect read makes us. Generic words that also appear
# off work zones (CONSTRUCTION on a company van, GESPERRT on a closed car park) are weaker.
DEFAULT_PHRASES: dict[str, float] = {
    # English (MUTCD-style temporary traffic control signs)
    "ROAD WORK AHEAD": 1.0, "ROAD WORKS AHEAD": 1.0, "ROAD WORK": 1.0, "ROADWORKS": 1.0,
    "ROAD CLOSED": 1.0, "STREET CLOSED": 0.95, "LANE CLOSED": 1.0, "LANE ENDS": 0.7,
    "DETOUR": 0.95, "WORK ZONE": 1.0, "CONSTRUCTION ZONE": 1.0, "CONSTRUCTION AHEAD": 1.0,
    "CONSTRUCTION": 0.6, "MEN WORKING": 1.0, "WORKERS AHEAD": 1.0, "UTILITY WORK": 0.95,
    "FLAGGER AHEAD": 1.0, "BE PREPARED TO STOP": 0.8, "SIDEWALK CLOSED": 0.95,
    "END ROAD WORK": 1.0, "SHOULDER WORK": 0.95, "ONE LANE ROAD": 0.85, "BRIDGE CLOSED": 0.8,
    # German (StVO signage and site boards)
    "BAUSTELLE": 1.0, "UMLEITUNG": 0.95, "FAHRBAHNVERENGUNG": 1.0, "STRASSENARBEITEN": 1.0,
    "BAUARBEITEN": 0.95, "VOLLSPERRUNG": 0.95, "GESPERRT": 0.6, "BAUSTELLENAUSFAHRT": 1.0,
    # a few other languages of NATIX drivers
    "TRAVAUX": 0.9, "DEVIATION": 0.7, "OBRAS": 0.8, "DESVIO": 0.7, "LAVORI IN CORSO": 1.0,
}

FEATURE_NAMES: tuple[str, ...] = (
    "best_score",      # strength x similarity' x confidence of the best phrase match (0 if none)
    "best_similarity", # edit similarity of the best match (0 if none)
    "best_confidence", # OCR confidence of the text that matched best (0 if none)
    "matches",         # log1p(number of distinct phrases matched)
    "texts",           # log1p(number of text boxes read)
    "has_text",        # 1 if any text was read
    "mean_confidence", # mean OCR confidence over boxes (0 if none)
    "chars",           # log1p(total characters read)
)

_FOLD = str.maketrans({"Ä": "AE", "Ö": "OE", "Ü": "UE", "ß": "SS", "ẞ": "SS",
                       "0": "O", "1": "I", "5": "S", "|": "I", "€": "E"})


def normalise(text: str) -> str:
    """Upper-case, fold umlauts and look-alike digits, strip accents and non-letters."""
    t = text.upper().translate(_FOLD)
    t = unicodedata.normalize("NFKD", t)
    return "".join(ch for ch in t if "A" <= ch <= "Z")


def substring_distance(pattern: str, text: str) -> int:
    """Fewest edits (insert, delete, substitute, swap adjacent) turning `pattern` into some
    substring of `text` (Sellers' approximate matching with optimal-string-alignment swaps)."""
    m, n = len(pattern), len(text)
    if m == 0:
        return 0
    if n == 0:
        return m
    prev2: Optional[list[int]] = None
    prev = [0] * (n + 1)  # matching may start anywhere in text: row 0 is all zeros
    for i in range(1, m + 1):
        cur = [i] + [0] * n
        pc = pattern[i - 1]
        for j in range(1, n + 1):
            cost = 0 if pc == text[j - 1] else 1
            v = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if (prev2 is not None and j > 1 and pc == text[j - 2]
                    and pattern[i - 2] == text[j - 1]):
                v = min(v, prev2[j - 2] + 1)
            cur[j] = v
        prev2, prev = prev, cur
    return min(prev)


def phrase_similarity(phrase: str, text: str) -> float:
    """1 - edits / len(phrase) for the best approximate occurrence of `phrase` in `text`."""
    p = normalise(phrase)
    if not p:
        return 0.0
    return max(0.0, 1.0 - substring_distance(p, normalise(text)) / len(p))


@dataclass(frozen=True)
class PhraseMatch:
    phrase: str
    similarity: float
    score: float
    text: str
    confidence: float
    boxes: list[list[list[float]]]


def match_phrases(texts: Sequence[tuple[str, float, list]], phrases: dict[str, float], *,
                  min_similarity: float, fuzzy_min_len: int, window: int = 3) -> list[PhraseMatch]:
    """Best match per phrase over each box and runs of up to `window` consecutive boxes.

    `texts` holds (text, confidence, box) in reading order. A phrase shorter than
    `fuzzy_min_len` letters must match exactly (short words collide with random text).
    """
    candidates: list[tuple[str, float, list]] = []
    for i in range(len(texts)):
        for k in range(1, window + 1):
            run = texts[i:i + k]
            if len(run) < k:
                break
            joined = "".join(normalise(t[0]) for t in run)
            if joined:
                candidates.append((joined, float(np.mean([t[1] for t in run])), [t[2] for t in run]))
    best: dict[str, PhraseMatch] = {}
    for phrase, strength in phrases.items():
        p = normalise(phrase)
        if not p:
            continue
        need = 1.0 if len(p) < fuzzy_min_len else min_similarity
        for text, conf, boxes in candidates:
            if len(text) < len(p) * need - 1e-9:
                continue
            sim = max(0.0, 1.0 - substring_distance(p, text) / len(p))
            if sim < need:
                continue
            # A read at the similarity floor still counts half; a perfect read counts fully.
            lift = 1.0 if need >= 1.0 else 0.5 + 0.5 * (sim - need) / (1.0 - need)
            score = float(strength) * lift * conf
            old = best.get(phrase)
            if old is None or score > old.score:
                best[phrase] = PhraseMatch(phrase, round(sim, 4), round(score, 4), text,
                                           round(conf, 4), boxes)
    return sorted(best.values(), key=lambda m: -m.score)


@dataclass(frozen=True)
class OcrSignOptions:
    """Options of the OCR sign tier (YAML `options:`)."""

    # Sign phrases and their strength in (0, 1] (replaces the default vocabulary when given).
    phrases: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PHRASES))
    # Lowest edit similarity (1 - edits/length) that counts as a match.
    min_similarity: float = 0.8
    # Phrases shorter than this many letters must match exactly.
    fuzzy_min_len: int = 6
    # Lowest recogniser confidence for a text box to be kept.
    min_confidence: float = 0.5
    # Detector box score threshold (PP-OCR `box_thresh`).
    box_thresh: float = 0.5
    # Detector pixel threshold (PP-OCR `thresh`).
    det_thresh: float = 0.3
    # Box expansion of the DB detector (PP-OCR `unclip_ratio`).
    unclip_ratio: float = 1.6
    # Longest side OCR runs at; larger images are downscaled. 1024 read as many dev-set signs as
    # 1408 or 1920 at about half the CPU time (README, "Cue tiers").
    max_side: int = 1024
    # Smaller images are upscaled until their shorter side reaches this (capped by max_side).
    min_side: int = 512
    # onnxruntime intra-op threads per model (0 = onnxruntime's default, all cores).
    threads: int = 2
    # Run PP-OCR's 0/180 degree text-angle classifier (signs are upright: off saves time).
    use_angle_cls: bool = False
    # Probability when no text at all is read (absence of text is weak evidence).
    prior_no_text: float = 0.3
    # Probability when text is read but no phrase matches.
    prior_unmatched: float = 0.3
    # Probability of a perfect, confident read of a full-strength phrase.
    max_prob: float = 0.95

    def validate(self, source: str, prefix: str) -> None:
        for phrase, strength in self.phrases.items():
            if not normalise(phrase):
                raise ConfigError(source, f"{prefix}.phrases.{phrase}", "a phrase with letters")
            if not 0.0 < strength <= 1.0:
                raise ConfigError(source, f"{prefix}.phrases.{phrase}", "a strength in (0, 1]", strength)
        for name in ("min_similarity", "min_confidence", "box_thresh", "det_thresh",
                     "prior_no_text", "prior_unmatched"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(source, f"{prefix}.{name}", "a number in [0, 1)", v)
        if not 0.5 < self.max_prob <= 1.0:
            raise ConfigError(source, f"{prefix}.max_prob", "a number in (0.5, 1]", self.max_prob)
        if self.max_side < 64 or self.min_side < 32:
            raise ConfigError(source, f"{prefix}.max_side", "max_side >= 64 and min_side >= 32",
                              (self.max_side, self.min_side))
        if self.threads < 0:
            raise ConfigError(source, f"{prefix}.threads", "an integer >= 0", self.threads)


def _ocr_input(image: Image.Image, max_side: int, min_side: int) -> tuple[np.ndarray, float]:
    """BGR array sized for the detector, and the factor mapping its pixels back to the image.

    We size the image here (and run PP-OCR at native size) because PP-OCR's own `min` limit
    upscales a long thin image without bound.
    """
    im = image if image.mode == "RGB" else image.convert("RGB")
    w, h = im.size
    if w < 1 or h < 1:
        raise ValueError(f"empty image {w}x{h}")
    scale = min(max_side / max(w, h), max(1.0, min_side / min(w, h)))
    if abs(scale - 1.0) > 1e-3:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    arr = np.asarray(im)
    ph, pw = max(0, 32 - arr.shape[0]), max(0, 32 - arr.shape[1])
    if ph or pw:  # tiny images: pad instead of blowing them up
        arr = np.pad(arr, ((0, ph), (0, pw), (0, 0)), constant_values=127)
    return np.ascontiguousarray(arr[:, :, ::-1]), 1.0 / scale


class OcrSignTier(Tier):
    """PP-OCR reads text; fuzzy phrase matching turns it into P(roadwork) with evidence."""

    Options = OcrSignOptions

    def __init__(self, spec: TierSpec) -> None:
        super().__init__(spec)
        self._engine: Any = None
        self._lock = threading.Lock()  # RapidOCR keeps per-call state on the instance

    # lifecycle ---------------------------------------------------------------------------------
    def load(self, device: str) -> None:
        """Build the RapidOCR engine from the models inside the pip package (CPU onnxruntime)."""
        from rapidocr_onnxruntime import RapidOCR

        o = self.options
        threads = o.threads if o.threads > 0 else -1
        self._engine = RapidOCR(
            intra_op_num_threads=threads, inter_op_num_threads=1 if threads > 0 else -1,
            use_cls=o.use_angle_cls, text_score=o.min_confidence, print_verbose=False,
            max_side_len=max(o.max_side, 64) + 64, min_side_len=30,
            det_limit_type="max", det_limit_side_len=o.max_side, det_thresh=o.det_thresh,
            det_box_thresh=o.box_thresh, det_unclip_ratio=o.unclip_ratio)
        if device != "cpu":
            logger.info("{}: RapidOCR runs on the CPU (requested {})", self.name, device)
        self.device = "cpu"

    def close(self) -> None:
        self._engine = None

    # reading -----------------------------------------------------------------------------------
    def read(self, image: Image.Image) -> list[tuple[str, float, list]]:
        """(text, confidence, box) per text line read, in reading order; box in image pixels."""
        if self._engine is None:
            raise RuntimeError(f"tier {self.name}: not loaded")
        arr, back = _ocr_input(image, self.options.max_side, self.options.min_side)
        o = self.options
        with self._lock:
            result, _ = self._engine(arr, box_thresh=o.box_thresh, unclip_ratio=o.unclip_ratio,
                                     text_score=o.min_confidence)
        texts = []
        for box, text, conf in result or []:
            pts = [[round(float(x) * back, 1), round(float(y) * back, 1)] for x, y in box]
            texts.append((str(text), float(conf), pts))
        return texts

    def analyse(self, image: Image.Image) -> tuple[np.ndarray, float, dict[str, Any]]:
        """Feature vector, hand-set probability and evidence of one image."""
        o = self.options
        texts = self.read(image)
        matches = match_phrases(texts, o.phrases, min_similarity=o.min_similarity,
                                fuzzy_min_len=o.fuzzy_min_len)
        best = matches[0] if matches else None
        if best is not None:
            p = 0.5 + (o.max_prob - 0.5) * min(1.0, best.score)
        else:
            p = o.prior_unmatched if texts else o.prior_no_text
        confs = [t[1] for t in texts]
        x = np.array([
            best.score if best else 0.0,
            best.similarity if best else 0.0,
            best.confidence if best else 0.0,
            math.log1p(len(matches)),
            math.log1p(len(texts)),
            1.0 if texts else 0.0,
            float(np.mean(confs)) if confs else 0.0,
            math.log1p(sum(len(t[0]) for t in texts)),
        ], dtype=np.float32)
        evidence: dict[str, Any] = {
            "matches": [{"phrase": m.phrase, "similarity": m.similarity, "score": m.score,
                         "read": m.text, "confidence": m.confidence, "boxes": m.boxes}
                        for m in matches[:5]],
            "texts": [{"text": t, "confidence": round(c, 4), "box": b} for t, c, b in texts[:20]],
            "n_texts": len(texts),
            "features": [round(float(v), 5) for v in x],
        }
        return x, p, evidence

    def output_range(self) -> tuple[float, float]:
        """What `analyse` can answer: a prior without a match, 0.5 .. max_prob with one; the
        engine skips the tier where nothing in this range could change the decision."""
        o = self.options
        return (min(o.prior_no_text, o.prior_unmatched, 0.5), max(o.prior_no_text, o.prior_unmatched, o.max_prob))

    def feature_names(self) -> list[str]:
        return list(FEATURE_NAMES)

    def predict(self, images: Sequence[Image.Image]) -> list[TierOutput | Exception]:
        results: list[TierOutput | Exception] = []
        for image in images:
            try:
                _, p, evidence = self.analyse(image)
                if not math.isfinite(p):
                    raise ValueError(f"non-finite probability {p}")
                results.append(TierOutput(prob=min(1.0, max(0.0, p)), evidence=evidence))
            except Exception as exc:  # one bad image never fails the batch
                results.append(exc)
        return results

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["engine"] = "rapidocr-onnxruntime PP-OCRv4 det+rec"
        return info
