"""The miner's uncertain-case store as a labelled image folder: export it, label it, train on it.

Why: the images a live miner was least sure about are the ones worth a person's time. `export`
copies them out of the store (`cascade.store`, read-only, so the miner may keep running) into an
ordinary image folder: `images/` plus a `manifest.csv` with the columns every toolkit command
reads (`path,label,source,split`) and, as extra columns, what the miner saw and said (`answer`,
`fused`, `reason`, `decision`, `raw:<tier>`, `cal:<tier>`, `cond:<condition>` flags and scores).
`label` starts empty; the dataset loader leaves unlabelled rows out, so the folder can be passed
to `train` and `calibrate` (`--images DIR`, alongside other folders) at any time and each run uses
the rows labelled so far. Exporting again into the same folder appends the new items and keeps
every label and split already there.

Labelling, minimal and scriptable: `set_labels` (by SHA-256 prefix or path), `labels_from_csv`,
`label_interactively` (one prompt per unlabelled image, saved after each answer) and
`contact_sheet` (a PNG of the unlabelled images with their keys, to label from one picture).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from loguru import logger

BASE_COLUMNS = ["path", "label", "source", "split"]
SOURCE = "miner-store"
MANIFEST = "manifest.csv"


def _split_for(sha: str, val_fraction: float) -> str:
    h = int(sha[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def item_row(item: Mapping[str, Any], val_fraction: float) -> dict[str, str]:
    """One manifest row for a stored item (label empty)."""
    rec = item.get("record") or {}
    row = {"path": f"images/{item['sha256'][:2]}/{item['sha256']}.jpg", "label": "", "source": SOURCE,
           "split": _split_for(item["sha256"], val_fraction), "sha256": item["sha256"],
           "created": dt.datetime.fromtimestamp(float(item["created"]), dt.timezone.utc).isoformat(timespec="seconds"),
           "reason": item.get("reason", ""), "answer": _fmt(item.get("prob")),
           "fused": _fmt(rec.get("fused")), "stopped_after": _fmt(rec.get("stopped_after")),
           "decision": _fmt(rec.get("decision"))}
    for tier, p in (rec.get("raw_probs") or {}).items():
        row[f"raw:{tier}"] = _fmt(p)
    for tier, p in (rec.get("tier_probs") or {}).items():
        row[f"cal:{tier}"] = _fmt(p)
    for key, v in (rec.get("conditions") or {}).items():
        row[f"cond:{key}"] = _fmt(v)
    return row


def read_manifest(folder: Path) -> tuple[list[str], list[dict[str, str]]]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return list(BASE_COLUMNS), []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or BASE_COLUMNS), [dict(r) for r in reader]


def write_manifest(folder: Path, columns: Sequence[str], rows: Iterable[Mapping[str, str]]) -> Path:
    """Write atomically (a crash mid-write never loses the labels already given)."""
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    os.replace(tmp, path)
    return path


def export_store(store_dir: Path, out_dir: Path, *, val_fraction: float = 0.25,
                 reasons: Optional[Sequence[str]] = None) -> dict[str, int]:
    """Copy the store's items into `out_dir` (images + manifest.csv); returns counts.

    Items already in the folder (same SHA-256) keep their row, label and split; new ones are
    appended with an empty label and a split drawn from their hash (`val_fraction` to `val`).
    """
    from cascade.store import read_items

    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1], got {val_fraction}")
    items = read_items(store_dir)
    if reasons:
        items = [it for it in items if it["reason"] in set(reasons)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns, rows = read_manifest(out_dir)
    known = {r.get("sha256") for r in rows if r.get("sha256")}
    added = 0
    missing = 0
    for it in items:
        if it["sha256"] in known:
            continue
        src = Path(it["path"])
        if not src.exists():  # evicted between the index read and the copy
            missing += 1
            continue
        row = item_row(it, val_fraction)
        dst = out_dir / row["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        for c in row:
            if c not in columns:
                columns.append(c)
        rows.append(row)
        known.add(it["sha256"])
        added += 1
    write_manifest(out_dir, columns, rows)
    labelled = sum(1 for r in rows if (r.get("label") or "").strip())
    logger.info("exported {} new items to {} ({} rows, {} labelled)", added, out_dir, len(rows), labelled)
    return {"added": added, "rows": len(rows), "labelled": labelled, "missing": missing}


def _parse_label(value: str) -> Optional[int]:
    v = value.strip().lower()
    if v in ("1", "y", "yes", "roadwork"):
        return 1
    if v in ("0", "n", "no", "none"):
        return 0
    return None


def _match(rows: list[dict[str, str]], key: str) -> dict[str, str]:
    key = key.strip()
    by_path = [r for r in rows if r.get("path") == key]
    if by_path:
        return by_path[0]
    if len(key) < 6:
        raise ValueError(f"{key!r}: give a path from the manifest or at least 6 characters of a SHA-256")
    hits = [r for r in rows if (r.get("sha256") or "").startswith(key.lower())]
    if len(hits) != 1:
        raise ValueError(f"{key!r} matches {len(hits)} rows (need exactly one)")
    return hits[0]


def set_labels(folder: Path, labels: Mapping[str, "int | str"]) -> int:
    """Record labels by path or SHA-256 prefix; returns how many rows changed."""
    columns, rows = read_manifest(folder)
    if not rows:
        raise ValueError(f"{Path(folder) / MANIFEST}: no rows to label")
    changed = 0
    for key, value in labels.items():
        lab = _parse_label(str(value))
        if lab is None:
            raise ValueError(f"{key}: label must be 0 or 1 (or y/n), got {value!r}")
        row = _match(rows, key)
        if row.get("label") != str(lab):
            row["label"] = str(lab)
            changed += 1
    write_manifest(folder, columns, rows)
    return changed


def labels_from_csv(path: Path) -> dict[str, str]:
    """{path or sha256: label} from a CSV with a `label` column and a `path` or `sha256` column."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        key = "sha256" if "sha256" in cols else "path"
        if "label" not in cols or key not in cols:
            raise ValueError(f"{path}: needs a label column and a path or sha256 column (has {sorted(cols)})")
        return {r[key]: r["label"] for r in reader if (r.get("label") or "").strip()}


def counts(folder: Path) -> dict[str, Any]:
    _, rows = read_manifest(folder)
    labelled = [r for r in rows if (r.get("label") or "").strip()]
    return {"rows": len(rows), "labelled": len(labelled),
            "roadwork": sum(r["label"].strip() == "1" for r in labelled),
            "unlabelled": len(rows) - len(labelled)}


def describe_row(row: Mapping[str, str]) -> str:
    """One line on what the miner saw and said about an image."""
    tiers = ", ".join(f"{c[4:]} {row[c]}" for c in row if c.startswith("raw:") and row[c])
    conds = [c[5:] for c in row if c.startswith("cond:") and not c.endswith("_score")
             and row[c] == "1" and c[5:] != "day"]
    return (f"{row.get('path')}  answer {row.get('answer') or '?'} ({row.get('reason') or '?'})"
            f"  tiers: {tiers or '-'}  conditions: {', '.join(conds) or '-'}")


def label_interactively(folder: Path, ask: Callable[[str], str] = input,
                        say: Callable[[str], None] = print) -> dict[str, int]:
    """Ask for each unlabelled image: 1 roadwork, 0 none, s skip, b back, q quit; saved each time."""
    columns, rows = read_manifest(folder)
    todo = [r for r in rows if not (r.get("label") or "").strip()]
    done: list[dict[str, str]] = []
    i = 0
    say(f"{len(todo)} unlabelled images in {folder}; open them in any image viewer "
        f"(paths relative to the folder). 1 = roadwork, 0 = none, s = skip, b = back, q = quit")
    while i < len(todo):
        row = todo[i]
        answer = ask(f"[{i + 1}/{len(todo)}] {describe_row(row)}\n  label? ").strip().lower()
        if answer in ("q", "quit"):
            break
        if answer in ("b", "back"):
            if done:
                prev = done.pop()
                prev["label"] = ""
                write_manifest(folder, columns, rows)
                i = todo.index(prev)
            continue
        if answer in ("s", "skip", ""):
            i += 1
            continue
        lab = _parse_label(answer)
        if lab is None:
            say("  answer 1, 0, s, b or q")
            continue
        row["label"] = str(lab)
        done.append(row)
        write_manifest(folder, columns, rows)
        i += 1
    return {"labelled": len(done), "left": sum(1 for r in rows if not (r.get("label") or "").strip())}


def contact_sheet(folder: Path, png: Path, *, limit: int = 48, thumb: int = 200) -> Path:
    """A grid of the unlabelled images, each captioned with its SHA-256 prefix (a `--set` key)."""
    from PIL import Image, ImageDraw

    _, rows = read_manifest(folder)
    todo = [r for r in rows if not (r.get("label") or "").strip()][:limit]
    if not todo:
        raise ValueError(f"{folder}: nothing left to label")
    cols = min(6, len(todo))
    n_rows = (len(todo) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * thumb, n_rows * (thumb + 18)), (30, 30, 30))
    draw = ImageDraw.Draw(sheet)
    for k, row in enumerate(todo):
        x, y = (k % cols) * thumb, (k // cols) * (thumb + 18)
        try:
            with Image.open(Path(folder) / row["path"]) as im:
                im = im.convert("RGB")
                im.thumbnail((thumb, thumb))
                sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        except OSError:
            pass
        key = (row.get("sha256") or hashlib.sha256(row["path"].encode()).hexdigest())[:8]
        draw.text((x + 4, y + thumb + 2), f"{key}  p={row.get('answer') or '?'}", fill=(240, 240, 240))
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(png)
    return png
