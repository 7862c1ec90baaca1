"""`model_card.json`: what the subnet asked miners to publish next to their Hugging Face model.

Fields, as the subnet defined them: `model_name`, `description`, `version` ("X.Y.Z"),
`submitted_by` (the miner's hotkey ss58) and `submission_time` (unix seconds, an integer).
"""

import json
import re
import time
from pathlib import Path
from typing import Any, Optional

from bittensor_wallet import Keypair

VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
FIELDS = ("model_name", "description", "version", "submitted_by", "submission_time")


def validate_model_card(card: dict[str, Any]) -> list[str]:
    """Every problem with a card (empty list = valid)."""
    problems = [f"missing field '{k}'" for k in FIELDS if k not in card]
    extra = sorted(set(card) - set(FIELDS))
    if extra:
        problems.append(f"unknown fields {extra}")
    if "model_name" in card and (not isinstance(card["model_name"], str) or not card["model_name"]):
        problems.append("model_name must be a non-empty string")
    if "description" in card and not isinstance(card["description"], str):
        problems.append("description must be a string")
    if "version" in card and not (isinstance(card["version"], str)
                                  and VERSION_RE.match(card["version"])):
        problems.append(f"version must look like X.Y.Z, got {card.get('version')!r}")
    if "submitted_by" in card:
        try:
            Keypair(ss58_address=card["submitted_by"])
        except (ValueError, TypeError):
            problems.append(f"submitted_by must be an ss58 hotkey, got {card['submitted_by']!r}")
    if "submission_time" in card:
        t = card["submission_time"]
        if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
            problems.append(f"submission_time must be unix seconds (an integer), got {t!r}")
    return problems


def build_model_card(*, model_name: str, description: str, version: str, hotkey_ss58: str,
                     submission_time: Optional[int] = None) -> dict[str, Any]:
    """A valid card, or ValueError listing what is wrong."""
    card = {"model_name": model_name, "description": description, "version": version,
            "submitted_by": hotkey_ss58,
            "submission_time": int(time.time()) if submission_time is None else int(submission_time)}
    problems = validate_model_card(card)
    if problems:
        raise ValueError("; ".join(problems))
    return card


def write_model_card(path: Path, card: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path
