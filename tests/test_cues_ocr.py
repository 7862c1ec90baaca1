"""OCR sign tier: the real bundled PP-OCR reads rendered signs; fuzzy matching; odd inputs."""

import pytest
from PIL import Image, ImageDraw, ImageFont

from cascade.config import TierSpec
from cascade.errors import ConfigError
from cascade.tier import TierOutput
from models.ocr_signs import (DEFAULT_PHRASES, FEATURE_NAMES, OcrSignTier, match_phrases, normalise,
                              phrase_similarity, substring_distance)

pytest.importorskip("rapidocr_onnxruntime")


def _spec(tmp_path, **options) -> TierSpec:
    return TierSpec(name="ocr_signs.test", backend="ocr_signs", artifacts_dir=str(tmp_path),
                    options={"threads": 1, **options})


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    t = OcrSignTier(_spec(tmp_path_factory.mktemp("ocr")))
    t.load("cpu")
    yield t
    t.close()


def _sign(text: str, size: int = 44, w: int = 800, h: int = 480) -> Image.Image:
    """A street-ish frame with an orange sign carrying black capitals (Pillow's built-in font)."""
    img = Image.new("RGB", (w, h), (110, 112, 115))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, w, h // 3), fill=(160, 190, 225))
    font = ImageFont.load_default(size=size)
    box = d.multiline_textbbox((0, 0), text, font=font)
    tw, th = box[2] - box[0], box[3] - box[1]
    x0, y0 = (w - tw) // 2, (h - th) // 2
    d.rectangle((x0 - 24, y0 - 24, x0 + tw + 24, y0 + th + 34), fill=(250, 130, 10))
    d.multiline_text((x0, y0), text, fill=(0, 0, 0), font=font, align="center")
    return img


def test_reads_road_work_ahead(tier):
    out = tier.predict([_sign("ROAD WORK AHEAD")])[0]
    assert isinstance(out, TierOutput), out
    assert out.prob > 0.85
    phrases = [m["phrase"] for m in out.evidence["matches"]]
    assert "ROAD WORK AHEAD" in phrases
    best = out.evidence["matches"][0]
    assert best["similarity"] >= 0.9 and best["confidence"] > 0.8 and best["boxes"]
    assert out.evidence["texts"] and len(out.evidence["features"]) == len(FEATURE_NAMES)


def test_misspelled_sign_still_matches_and_multiline_joins(tier):
    outs = tier.predict([_sign("RAOD WORK"), _sign("ROAD\nCLOSED")])
    misspelled, two_lines = outs
    assert misspelled.prob > 0.7
    assert "ROAD WORK" in [m["phrase"] for m in misspelled.evidence["matches"]]
    assert two_lines.prob > 0.85
    assert "ROAD CLOSED" in [m["phrase"] for m in two_lines.evidence["matches"]]


def test_unrelated_text_and_no_text_stay_low(tier):
    pizza, blank = tier.predict([_sign("PIZZA"), Image.new("RGB", (640, 480), (110, 112, 115))])
    assert pizza.prob < 0.5 and pizza.evidence["matches"] == []
    assert any("PIZZA" in t["text"].upper() for t in pizza.evidence["texts"])
    assert pizza.prob == pytest.approx(tier.options.prior_unmatched)
    assert blank.prob == pytest.approx(tier.options.prior_no_text)
    assert blank.evidence["n_texts"] == 0


def test_odd_images_do_not_raise(tier):
    odd = [Image.new("RGB", (1, 1)), Image.new("RGB", (3000, 4), (255, 255, 255)),
           Image.new("L", (5, 2000), 128), Image.new("RGBA", (50, 50), (0, 0, 0, 0))]
    outs = tier.predict(odd)
    assert len(outs) == len(odd)
    for o in outs:
        assert isinstance(o, TierOutput), o
        assert 0.0 <= o.prob <= 1.0


def test_normalise_folds_case_umlauts_and_digits():
    assert normalise("Straßenarbeiten") == "STRASSENARBEITEN"
    assert normalise("Fahrbahn-Verengung!") == "FAHRBAHNVERENGUNG"
    assert normalise("r0ad w0rk") == "ROADWORK"
    assert normalise("Ümleitung") == "UEMLEITUNG"
    assert normalise("Déviation") == "DEVIATION"


def test_substring_distance():
    assert substring_distance("ROADWORK", "XXROADWORKAHEAD") == 0
    assert substring_distance("ROADWORK", "RAODWORK") == 1  # a swap is one edit
    assert substring_distance("DETOUR", "DETOR") == 1
    assert substring_distance("ABC", "") == 3
    assert substring_distance("", "ABC") == 0
    assert phrase_similarity("ROAD WORK", "raod w0rk") == pytest.approx(0.875)
    assert phrase_similarity("BAUSTELLE", "PIZZA") < 0.5


def test_match_phrases_rules():
    phrases = dict(DEFAULT_PHRASES)
    texts = [("ROAD", 0.95, [[0, 0]]), ("CLOSED", 0.9, [[0, 1]])]
    best = match_phrases(texts, phrases, min_similarity=0.8, fuzzy_min_len=6)[0]
    assert best.phrase == "ROAD CLOSED" and best.similarity == 1.0 and len(best.boxes) == 2
    # a place name two edits from LANE ENDS must not match at 0.8
    assert not match_phrases([("LANGENDREER WEST", 0.95, [])], phrases, min_similarity=0.8,
                             fuzzy_min_len=6)
    # short phrases need an exact read (after folding 5 -> S), one wrong letter is not enough
    assert match_phrases([("OBRA5", 0.9, [])], {"OBRAS": 1.0}, min_similarity=0.5, fuzzy_min_len=6)
    assert match_phrases([("OBRBS", 0.9, [])], {"OBRAS": 1.0}, min_similarity=0.5, fuzzy_min_len=6) == []
    weak = match_phrases([("CONSTRUCTION", 1.0, [])], phrases, min_similarity=0.8, fuzzy_min_len=6)
    strong = match_phrases([("BAUSTELLE", 1.0, [])], phrases, min_similarity=0.8, fuzzy_min_len=6)
    assert strong[0].score > weak[0].score


def test_options_validation(tmp_path):
    with pytest.raises(ConfigError, match="phrases"):
        OcrSignTier(_spec(tmp_path, phrases={"ROAD WORK": 1.5}))
    with pytest.raises(ConfigError, match="min_similarity"):
        OcrSignTier(_spec(tmp_path, min_similarity=1.2))
    with pytest.raises(ConfigError, match="unknown key"):
        OcrSignTier(_spec(tmp_path, no_such_option=1))
