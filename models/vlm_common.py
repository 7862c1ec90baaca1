"""What every VLM tier shares: the question, the answer tokens, and the log-probability reader.

A VLM is asked one yes/no question and generates one token. Its probability of roadwork is read
from the log-probabilities of that token, never from parsed text:

    p = sum_yes exp(lp) / (sum_yes exp(lp) + sum_no exp(lp))

where the sums run over the spellings a tokenizer may produce ("Yes", " Yes", "yes", "YES" ...).
Free text would give only 0 or 1 and would break on "Sure, ...". With top-k log-probabilities
(vLLM, OpenAI-compatible servers) an answer side missing from the top k is bounded by the smallest
log-probability listed, a conservative estimate that is flagged in the evidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from cascade.errors import ConfigError

DEFAULT_QUESTION = (
    "Look at this street image. Is there road work or a construction zone visible on or next to "
    "the road (for example traffic cones, construction barriers, road work signs, excavators or "
    "workers repairing the road)? Answer with one word: Yes or No."
)
YES_WORDS: tuple[str, ...] = ("yes",)
NO_WORDS: tuple[str, ...] = ("no",)


@dataclass(frozen=True)
class VLMOptions:
    """Settings every VLM backend shares (its own Options extend these)."""

    # The yes/no question asked about every image.
    question: str = DEFAULT_QUESTION
    # Optional system prompt (None: the chat template's default).
    system_prompt: Optional[str] = None
    # Images are downscaled so their long side is at most this many pixels (fewer vision tokens).
    max_image_side: int = 896
    # How many top log-probabilities to request for the one generated token.
    top_logprobs: int = 20

    def validate(self, source: str, prefix: str) -> None:
        if not self.question.strip():
            raise ConfigError(source, f"{prefix}.question", "a non-empty question")
        if self.max_image_side < 28:
            raise ConfigError(source, f"{prefix}.max_image_side", "an integer >= 28",
                              self.max_image_side)
        if not 1 <= self.top_logprobs <= 20:
            raise ConfigError(source, f"{prefix}.top_logprobs", "an integer in [1, 20]",
                              self.top_logprobs)


def answer_word(token_text: str) -> Optional[str]:
    """'yes' / 'no' if a token's text is a spelling of that answer, else None."""
    word = token_text.replace("\u2581", " ").replace("\u0120", " ").strip().strip(".,!:").lower()
    if word in YES_WORDS:
        return "yes"
    if word in NO_WORDS:
        return "no"
    return None


def answer_token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Ids of the single tokens that spell yes / no in this tokenizer (all common variants)."""
    yes: set[int] = set()
    no: set[int] = set()
    for variant in ("Yes", " Yes", "yes", " yes", "YES", " YES", "No", " No", "no", " no", "NO", " NO"):
        ids = tokenizer.encode(variant, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
            continue
        word = answer_word(variant)
        if answer_word(tokenizer.decode(ids)) != word:  # e.g. an <unk> or a sub-word piece
            continue
        (yes if word == "yes" else no).add(int(ids[0]))
    if not yes or not no:
        raise ValueError("the tokenizer has no single-token spelling of Yes and No; "
                         "this VLM cannot be scored from next-token log-probabilities")
    return sorted(yes), sorted(no)


def _logsumexp(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return -math.inf
    m = max(vals)
    if m == -math.inf:
        return -math.inf
    return m + math.log(sum(math.exp(v - m) for v in vals))


def prob_from_logprobs(lp_yes: float, lp_no: float) -> float:
    """exp(lp_yes) / (exp(lp_yes) + exp(lp_no)), computed stably."""
    if lp_yes == -math.inf and lp_no == -math.inf:
        raise ValueError("neither yes nor no has any probability")
    if lp_no == -math.inf:
        return 1.0
    return 1.0 / (1.0 + math.exp(lp_no - lp_yes)) if lp_no - lp_yes < 700 else 0.0


def prob_from_logits(logits: Sequence[float] | np.ndarray, yes_ids: Sequence[int],
                     no_ids: Sequence[int]) -> tuple[float, dict]:
    """Probability of yes from a full next-token logit vector (transformers path)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    lse = z.max() + np.log(np.exp(z - z.max()).sum())
    logp = z - lse
    lp_yes = _logsumexp(logp[list(yes_ids)].tolist())
    lp_no = _logsumexp(logp[list(no_ids)].tolist())
    return prob_from_logprobs(lp_yes, lp_no), {"lp_yes": round(lp_yes, 4), "lp_no": round(lp_no, 4),
                                               "answer_mass": round(math.exp(lp_yes) + math.exp(lp_no), 4)}


def _absent_bound(listed: Sequence[float]) -> float:
    """Upper bound on the logprob of a token missing from a top-k: at most the smallest listed
    one and at most the mass the listed tokens leave (with top_logprobs=1 the smallest listed
    is the answer itself, and a confident "No" alone would otherwise score 0.5)."""
    rest = 1.0 - sum(math.exp(v) for v in listed)
    return min(min(listed), math.log(max(rest, 1e-12)))


def _combine(yes: list[float], no: list[float], floor: float) -> tuple[float, dict]:
    """Yes/no logprob lists of a top-k -> probability; an absent side is bounded by `floor`."""
    if not yes and not no:
        raise ValueError("neither a Yes nor a No token among the returned log-probabilities")
    lp_yes = _logsumexp(yes) if yes else floor
    lp_no = _logsumexp(no) if no else floor
    return prob_from_logprobs(lp_yes, lp_no), {"lp_yes": round(lp_yes, 4), "lp_no": round(lp_no, 4),
                                               "bounded": not yes or not no}


def prob_from_top_logprobs(top: Mapping[str, float] | Sequence[tuple[str, float]]) -> tuple[float, dict]:
    """Probability of yes from the top-k (token text -> logprob) of the one generated token
    (OpenAI-compatible servers).

    A side absent from the top k is bounded by the smallest listed logprob (flagged `bounded`);
    a top k with neither side is an error (the model did not answer the question).
    """
    items = list(top.items()) if isinstance(top, Mapping) else list(top)
    if not items:
        raise ValueError("no log-probabilities returned")
    yes = [lp for tok, lp in items if answer_word(tok) == "yes"]
    no = [lp for tok, lp in items if answer_word(tok) == "no"]
    if not yes and not no:
        shown = [tok for tok, _ in items[:5]]
        raise ValueError(f"neither Yes nor No among the top {len(items)} tokens {shown}")
    return _combine(yes, no, _absent_bound([lp for _, lp in items]))


def prob_from_id_logprobs(logprobs: Mapping[int, float], yes_ids: Sequence[int],
                          no_ids: Sequence[int]) -> tuple[float, dict]:
    """Probability of yes from {token_id: logprob} of the one generated token (vLLM top-k)."""
    if not logprobs:
        raise ValueError("no log-probabilities returned")
    yes_set, no_set = set(yes_ids), set(no_ids)
    yes = [lp for tid, lp in logprobs.items() if tid in yes_set]
    no = [lp for tid, lp in logprobs.items() if tid in no_set]
    return _combine(yes, no, _absent_bound(list(logprobs.values())))


def shrink(image: Image.Image, max_side: int) -> Image.Image:
    """RGB copy with the long side at most `max_side` (fewer vision tokens, same content)."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    w, h = image.size
    scale = max_side / float(max(w, h))
    if scale >= 1.0:
        return image
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def chat_messages(options: VLMOptions, image_part: dict) -> list[dict]:
    """One user turn with the image then the question (system prompt if configured)."""
    messages: list[dict] = []
    if options.system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": options.system_prompt}]})
    messages.append({"role": "user", "content": [image_part, {"type": "text", "text": options.question}]})
    return messages
