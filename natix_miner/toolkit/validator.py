"""A local validator: queries a running miner over the real wire and scores it like SN72 does.

Why: the only honest test of a miner is the one a validator runs. This sends `ImageSynapse`
challenges through a real `bt.Dendrite` (signed by a validator hotkey, 9 s timeout, no retry),
draws labels 50/50, builds each image with the validator's pipeline of the chosen era
(`natix_miner.toolkit.challenge`) and scores the answers with the subnet's windows, reward and EMA
(`natix_miner.toolkit.scoring`). It works against a miner on this machine or anywhere reachable.

The dendrite signs for the receiving hotkey, and the axon checks that signature against its own
hotkey, so the miner's hotkey must be known: pass it, read it from the miner's wallet, or look
it up on the chain's metagraph by ip:port (`resolve_miner_hotkey`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from loguru import logger

from natix_miner.toolkit import challenge as ch
from natix_miner.toolkit.dataset import load_folder, select
from natix_miner.toolkit.metrics import binarize, mcc
from natix_miner.toolkit.scoring import DEFAULT_RULES, ScoreTracker, ScoringRules, is_valid_answer
from natix_miner.settings import VALIDATOR_TIMEOUT_S


class ValidationError(RuntimeError):
    """The local validator cannot run (bad address, unknown hotkey, empty folder)."""


@dataclass
class Round:
    """One challenge and what came back."""

    index: int
    era: str
    label: int
    prediction: Optional[float]
    valid: bool
    reward: float
    score: float
    # The validator's windows behind this round's reward (MCC of the last 100, accuracy of the
    # last 10; -1 answers take their slot and are dropped after the cut); `zeroed` when a NaN or
    # out-of-range answer in a window made the validator's metrics raise and read 0.
    mcc_window: float
    accuracy_window: float
    zeroed: bool
    latency_ms: float
    status_code: Optional[int]
    status_message: str
    source: str
    path: str
    level: Optional[int]


def parse_axon(address: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port), with a clear error."""
    host, sep, port_s = address.rpartition(":")
    if not sep or not host:
        raise ValidationError(f"--axon must be HOST:PORT, got {address!r}")
    try:
        port = int(port_s)
    except ValueError:
        raise ValidationError(f"--axon port must be a number, got {port_s!r}") from None
    if not 0 < port < 65536:
        raise ValidationError(f"--axon port must be in 1..65535, got {port}")
    return host.strip("[]"), port


def resolve_miner_hotkey(host: str, port: int, *, hotkey: Optional[str] = None,
                         wallet_name: Optional[str] = None, wallet_hotkey: Optional[str] = None,
                         wallet_path: Optional[str] = None, network: Optional[str] = None,
                         netuid: Optional[int] = None) -> str:
    """The ss58 hotkey the axon at host:port serves under.

    In order: the one given; the public hotkey of the miner's wallet; the chain's metagraph
    entry whose axon has this ip and port (needs `network` and `netuid`).
    """
    import bittensor as bt

    if hotkey:
        return hotkey
    if wallet_name:
        w = bt.Wallet(name=wallet_name, hotkey=wallet_hotkey or "default", path=wallet_path)
        try:
            return w.hotkeypub.ss58_address
        except Exception:   # older wallets have no hotkeypub file: the hotkey file itself
            try:
                return w.hotkey.ss58_address
            except Exception as exc:  # noqa: BLE001 - bittensor's KeyFileError and friends
                raise ValidationError(f"cannot read hotkey '{wallet_hotkey or 'default'}' of "
                                      f"wallet '{wallet_name}': {exc}") from None
    if network and netuid is not None:
        try:
            ip = socket.gethostbyname(host)
        except OSError as exc:
            raise ValidationError(f"cannot resolve the axon host {host!r}: {exc}") from None
        try:
            metagraph = bt.Subtensor(network=network).metagraph(netuid)
        except Exception as exc:
            raise ValidationError(f"cannot read the metagraph of netuid {netuid} on {network}: {exc}") from exc
        for ax in metagraph.axons:
            if ax.ip == ip and int(ax.port) == port:
                return ax.hotkey
        raise ValidationError(f"no axon at {ip}:{port} on netuid {netuid} ({network})")
    raise ValidationError("the miner's hotkey is needed to sign the request: pass --hotkey SS58 "
                          "(`natix-miner serve --local` prints it), --miner-wallet NAME, or "
                          "--network and --netuid to look it up on the chain")


@contextlib.contextmanager
def _fixed_external_ip(ip: str) -> Iterator[None]:
    """bittensor's Dendrite asks web services for its external ip at construction (and fails
    offline); the axon records the socket's address anyway, so a given ip is used instead."""
    from bittensor.utils import networking

    original = networking.get_external_ip
    networking.get_external_ip = lambda: ip
    try:
        yield
    finally:
        networking.get_external_ip = original


def make_dendrite(wallet: Any, external_ip: str = "0.0.0.0") -> Any:
    """A real `bt.Dendrite` for `wallet` that reports `external_ip` without network lookups."""
    import bittensor as bt

    with _fixed_external_ip(external_ip):
        return bt.Dendrite(wallet=wallet)


def _percentile(values: list[float], q: float) -> Optional[float]:
    return float(np.percentile(values, q)) if values else None


def summarise(rounds: list[Round]) -> dict[str, Any]:
    """MCC, accuracy, mean reward, invalid answers and latency over a list of rounds.

    MCC and accuracy are over the valid answers (what the model does; None when there is none);
    what invalid answers cost shows in `invalid` and in `reward` (the mean round reward, 0 for
    each invalid round). `final_score` is the EMA after the last round.
    """
    if not rounds:
        return {"n": 0}
    ok = [r for r in rounds if r.valid]
    y = np.array([r.label for r in ok], dtype=np.int64)
    pred = binarize([r.prediction for r in ok]) if ok else np.zeros(0, dtype=np.int64)
    lat = [r.latency_ms for r in rounds]
    return {"n": len(rounds),
            "mcc": mcc(y, pred) if ok else None,
            "accuracy": float(np.mean(pred == y)) if ok else None,
            "reward": float(np.mean([r.reward for r in rounds])),
            "final_score": rounds[-1].score,
            "invalid": len(rounds) - len(ok),
            "latency_p50_ms": _percentile(lat, 50),
            "latency_p99_ms": _percentile(lat, 99)}


def format_table(report: dict[str, Any]) -> str:
    """The per-era table printed at the end of a run."""
    head = f"{'era':<10} {'n':>5} {'MCC':>6} {'acc':>6} {'reward':>7} {'invalid':>7} {'p50 ms':>8} {'p99 ms':>8}"
    lines = [head, "-" * len(head)]
    rows = list(report["by_era"].items()) + [("all", report["overall"])]
    for era, s in rows:
        if not s.get("n"):
            continue
        mcc_s = "-" if s["mcc"] is None else f"{s['mcc']:.3f}"
        acc_s = "-" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
        lines.append(f"{era:<10} {s['n']:>5} {mcc_s:>6} {acc_s:>6} {s['reward']:>7.3f} "
                     f"{s['invalid']:>7} {s['latency_p50_ms']:>8.0f} {s['latency_p99_ms']:>8.0f}")
    lines.append(f"final score (EMA): {report['overall'].get('final_score', 0.0):.3f}   "
                 f"(MCC, acc: valid answers only; reward: mean per round, 0 when invalid)")
    return "\n".join(lines)


def _json_number(x: Any) -> Optional[float]:
    """A prediction as JSON can hold it (NaN and non-numbers become null)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


async def _next_challenge(pools: dict[int, list[Any]], era: str, rng: np.random.Generator,
                          attempts: int = 20) -> ch.Challenge:
    """A challenge; an unreadable image is logged and another drawn (a folder of them is an error)."""
    for _ in range(attempts):
        try:
            return await asyncio.to_thread(ch.draw_challenge, pools, era, rng)
        except (OSError, ValueError) as exc:
            logger.warning("skipping an unreadable image: {}", exc)
    raise ValidationError(f"{attempts} images in a row could not be read; check the folder")


async def run_validation(axon: str, images: Path, era: str = "mixed", n: int = 100, seed: int = 0, *,
                         split: Optional[str] = None, hotkey: Optional[str] = None,
                         timeout: float = VALIDATOR_TIMEOUT_S, json_path: Optional[Path] = None,
                         png_path: Optional[Path] = None, wallet: Any = None,
                         external_ip: str = "0.0.0.0", interval_s: float = 0.0,
                         rules: ScoringRules = DEFAULT_RULES, progress: bool = True,
                         print_table: bool = False) -> dict[str, Any]:
    """Send `n` challenges to the miner at `axon` and return the report (also written as JSON/PNG).

    `hotkey` is the miner's ss58 (see `resolve_miner_hotkey`); `wallet` the validator's (a
    throwaway one when None: a miner with a guard must allow its hotkey, which is logged and
    reported). `interval_s` paces challenges (validators send about one a minute per miner).
    """
    import bittensor as bt

    from natix_miner.protocol import ImageSynapse

    if era not in ch.ERA_CHOICES:
        raise ValidationError(f"era must be one of {', '.join(ch.ERA_CHOICES)}, got {era!r}")
    if n < 1:
        raise ValidationError(f"n must be >= 1, got {n}")
    host, port = parse_axon(axon)
    if not hotkey:
        raise ValidationError("run_validation needs the miner's hotkey (see resolve_miner_hotkey)")
    samples = select(load_folder(Path(images)), split)
    try:
        pools = ch.split_by_label(samples)
    except ValueError as exc:
        raise ValidationError(f"{images} (split {split or 'all'}): {exc}") from None

    tmp = None
    if wallet is None:
        tmp = tempfile.TemporaryDirectory(prefix="natix-validator-")
        from natix_miner.neuron import throwaway_wallet

        wallet = throwaway_wallet(Path(tmp.name), name="local-validator")
    validator_hotkey = wallet.hotkey.ss58_address
    logger.info("local validator {} -> miner {} at {}:{} ({} challenges, era {}, {} images)",
                validator_hotkey, hotkey, host, port, n, era, len(samples))
    dendrite = make_dendrite(wallet, external_ip)
    target = bt.AxonInfo(version=0, ip=host, port=port, ip_type=6 if ":" in host else 4,
                         hotkey=hotkey, coldkey="")
    rng = np.random.default_rng(seed)
    tracker = ScoreTracker(rules)
    rounds: list[Round] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"validate {era}", unit="challenge")
    try:
        for i in range(n):
            c = await _next_challenge(pools, era, rng)
            t0 = time.perf_counter()
            responses = await dendrite.forward(axons=[target], synapse=ImageSynapse(image=c.image_b64),
                                               timeout=timeout, deserialize=False)
            latency_ms = (time.perf_counter() - t0) * 1000.0
            resp = responses[0]
            prediction = getattr(resp, "prediction", None)
            status = getattr(getattr(resp, "dendrite", None), "status_code", None)
            message = str(getattr(getattr(resp, "dendrite", None), "status_message", "") or "")
            valid = is_valid_answer(prediction)
            scored = tracker.update(0, hotkey, prediction, c.label)   # every round, -1 included
            rounds.append(Round(index=i, era=c.meta["era"], label=c.label,
                                prediction=_json_number(prediction),
                                valid=valid, reward=scored.reward, score=scored.score,
                                mcc_window=scored.long.mcc, accuracy_window=scored.short.accuracy,
                                zeroed=scored.long.poisoned or scored.short.poisoned,
                                latency_ms=latency_ms,
                                status_code=None if status is None else int(status),
                                status_message=message, source=c.source, path=c.path,
                                level=c.meta.get("level")))
            if not valid:
                logger.debug("challenge {}: invalid answer {!r} (status {} {})", i, prediction, status, message)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(score=f"{tracker.score(0):.3f}", invalid=sum(not x.valid for x in rounds))
            if interval_s > 0 and i + 1 < n:
                await asyncio.sleep(interval_s)
    finally:
        if bar is not None:
            bar.close()
        await dendrite.aclose_session()
        if tmp is not None:
            tmp.cleanup()

    by_era = {e: summarise([r for r in rounds if r.era == e]) for e in ch.ERAS}
    statuses: dict[str, int] = {}
    for r in rounds:
        key = str(r.status_code)
        statuses[key] = statuses.get(key, 0) + 1
    first_error = next((f"{r.status_code} {r.status_message}" for r in rounds if not r.valid), None)
    report: dict[str, Any] = {
        "axon": f"{host}:{port}", "miner_hotkey": hotkey, "validator_hotkey": validator_hotkey,
        "era": era, "n": n, "seed": seed, "split": split or "all", "images": str(images),
        "timeout_s": timeout, "overall": summarise(rounds),
        "by_era": {e: s for e, s in by_era.items() if s.get("n")},
        "by_source": {src: summarise([r for r in rounds if r.source == src])
                      for src in sorted({r.source for r in rounds})},
        "status_codes": statuses, "first_error": first_error,
        "rules": asdict(rules), "rounds": [asdict(r) for r in rounds]}
    if report["overall"]["invalid"] == n:
        logger.warning("every answer was invalid (first: {}); if the miner refused the caller, allow "
                       "validator hotkey {} in its guard (miner.guard.allow_hotkeys)", first_error,
                       validator_hotkey)
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
        logger.info("report written to {}", json_path)
    if png_path is not None:
        from natix_miner.toolkit.plots import plot_validation

        plot_validation([r.reward for r in rounds], [r.score for r in rounds], Path(png_path),
                        invalid=[not r.valid for r in rounds],
                        title=f"{Path(images).name} ({split or 'all'} split), era {era}, {n} "
                              f"challenges: final score {report['overall']['final_score']:.3f}")
        logger.info("plot written to {}", png_path)
    if print_table:
        print(format_table(report))
    return report
