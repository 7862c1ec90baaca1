"""`natix-miner store`: the miner's uncertain cases out of the store, labelled, back into training."""

from __future__ import annotations

import argparse
from pathlib import Path

from loguru import logger

from natix_miner.commands.flags import add_config_arg
from natix_miner.settings import resolve_config_path


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name, help="export the uncertain-case store to a labelled folder, label it, see its size",
        description="The miner keeps the images it was least sure about (engine.store: near the "
                    "threshold, tiers disagreeing) with its tier outputs and the image conditions, "
                    "and no caller identity. `export` turns them into an image folder "
                    "(images/ + manifest.csv, label empty) that `train` and `calibrate` read with "
                    "--images DIR next to other folders; `label` records labels in it; `info` "
                    "shows the store's size against its budget.",
        epilog="Loop: natix-miner store export --out runs/labelled; natix-miner store label "
               "runs/labelled; natix-miner train --images runs/labelled --images <your data>; "
               "natix-miner calibrate ...")
    sub = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)

    ex = sub.add_parser("export", help="copy the stored items into a labelled-folder layout",
                        description="Copy every stored item into DIR/images/ and write "
                                    "DIR/manifest.csv (path,label,source,split plus answer, "
                                    "reason, raw:<tier>, cal:<tier>, cond:<condition> columns; "
                                    "label empty). Exporting into the same folder again adds the "
                                    "new items and keeps every label already given. Safe while "
                                    "the miner runs (the store is read read-only).")
    _store_arguments(ex)
    ex.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write (created)")
    ex.add_argument("--val-fraction", type=float, default=0.25, metavar="F",
                    help="share of new items whose split is 'val' (from a hash of the image, so "
                         "fixed per image; default 0.25; 0 = all train)")
    ex.add_argument("--reason", action="append", choices=["near_threshold", "disagreement", "random"],
                    help="export only items stored for this reason (repeatable; default: all)")
    ex.set_defaults(func=run_export)

    lb = sub.add_parser("label", help="record labels in an exported folder",
                        description="Without options: asks for each unlabelled image in turn "
                                    "(1 roadwork, 0 none, s skip, b back, q quit; the manifest is "
                                    "saved after every answer); open the printed path in any "
                                    "image viewer. --sheet draws the unlabelled images on one PNG "
                                    "with their keys, to label with --set.")
    lb.add_argument("folder", type=Path, metavar="DIR", help="a folder written by `store export`")
    lb.add_argument("--set", action="append", default=[], metavar="KEY=LABEL",
                    help="label one image: KEY is its path in the manifest or a SHA-256 prefix "
                         "(>= 6 characters), LABEL 1 (roadwork) or 0; repeatable")
    lb.add_argument("--from", dest="from_csv", type=Path, metavar="CSV",
                    help="labels from a CSV with a label column and a path or sha256 column")
    lb.add_argument("--sheet", type=Path, metavar="PNG",
                    help="write a contact sheet of the unlabelled images (captioned with their "
                         "keys) instead of asking")
    lb.add_argument("--show", action="store_true", help="print the label counts and stop")
    lb.set_defaults(func=run_label)

    info = sub.add_parser("info", help="items and bytes held against the store's budget")
    _store_arguments(info)
    info.set_defaults(func=run_info)
    return p


def _store_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arg(p)
    p.add_argument("--store", type=Path, default=None, metavar="DIR",
                   help="the store directory itself (overrides the config's engine.store.dir)")


def _store_dir(args: argparse.Namespace) -> Path:
    if args.store is not None:
        return args.store
    from cascade.config import load_cascade_config

    cfg = load_cascade_config(resolve_config_path(args.config))
    return cfg.resolve(cfg.engine.store.dir)


def run_export(args: argparse.Namespace) -> int:
    from cascade.errors import ConfigError
    from natix_miner.toolkit.store_folder import export_store

    try:
        got = export_store(_store_dir(args), args.out, val_fraction=args.val_fraction,
                           reasons=args.reason)
    except (ConfigError, FileNotFoundError, ValueError, OSError) as exc:
        logger.error("store export failed: {}", exc)
        return 2
    print(f"{got['added']} new items exported to {args.out} ({got['rows']} rows, {got['labelled']} "
          f"labelled); next: natix-miner store label {args.out}")
    return 0


def run_label(args: argparse.Namespace) -> int:
    from natix_miner.toolkit import store_folder as sf

    folder = args.folder
    if not (folder / sf.MANIFEST).exists():
        logger.error("{}: no manifest.csv (write one with `natix-miner store export --out {}`)",
                     folder, folder)
        return 2
    try:
        if args.show:
            pass
        elif args.sheet is not None:
            path = sf.contact_sheet(folder, args.sheet)
            print(f"contact sheet of the unlabelled images: {path} (label with --set KEY=1|0)")
        elif args.set or args.from_csv:
            labels: dict[str, str] = dict(sf.labels_from_csv(args.from_csv)) if args.from_csv else {}
            for item in args.set:
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"--set {item!r}: expected KEY=LABEL")
                labels[key] = value
            changed = sf.set_labels(folder, labels)
            print(f"{changed} labels recorded in {folder / sf.MANIFEST}")
        else:
            got = sf.label_interactively(folder)
            print(f"{got['labelled']} labelled this time, {got['left']} left")
    except (ValueError, OSError) as exc:
        logger.error("store label failed: {}", exc)
        return 2
    c = sf.counts(folder)
    print(f"{folder}: {c['labelled']} of {c['rows']} labelled ({c['roadwork']} roadwork); "
          f"train on it with: natix-miner train --images {folder} --images <your other folders>")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from cascade.config import load_cascade_config
    from cascade.errors import ConfigError
    from cascade.store import read_items

    try:
        directory = _store_dir(args)
        items = read_items(directory)
    except (ConfigError, FileNotFoundError, OSError) as exc:
        logger.error("store info failed: {}", exc)
        return 2
    size = sum(int(it["bytes"] or 0) for it in items)
    reasons: dict[str, int] = {}
    for it in items:
        reasons[it["reason"]] = reasons.get(it["reason"], 0) + 1
    budget = ""
    if args.store is None:
        cfg = load_cascade_config(resolve_config_path(args.config)).engine.store
        budget = f" (budget {cfg.max_items} items, {cfg.max_mb:.0f} MiB)"
    print(f"{directory}: {len(items)} items, {size / 2 ** 20:.1f} MiB{budget}; by reason: "
          + (", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "-"))
    return 0
