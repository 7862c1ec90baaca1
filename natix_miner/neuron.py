"""The miner neuron: wallet, chain, guard, axon and the seam to the cascade engine.

Threads and loops, because they decide whether one slow image stalls every validator:
- bittensor's axon runs uvicorn on its own thread and event loop; the forward runs there.
- the cascade engine lives on the neuron's own loop (the main thread's, or the `local`
  command's background thread), where it was started. The forward hands it the decoded image
  with `run_coroutine_threadsafe` and awaits the answer, so the axon loop only ever awaits.
- decoding (base64 + Pillow) runs in a small thread pool, also off the axon loop.

The answer budget (`engine.deadline_ms`) runs from the request's ARRIVAL, stamped by the HTTP
layer when its first byte reached the process (`natix_miner.axon_server`), not from forward
entry: time spent in the axon's queue, the guard or a re-sync wait is already spent. A request
that reaches the forward with less than `min_engine_budget_ms` left, or that waits in the
admission gate (`max_concurrent_forwards`, highest stake first) until it has, gets the fallback
at once; decode gets `decode.timeout_ms` of what is left; the engine gets the rest as
`engine.predict(image, deadline_s=remaining)`.

Every admitted request is answered with a number in [0, 1]: a decode failure, an engine error,
a shed request or a blown deadline gives `engine.fallback_probability`, and is logged with the
caller's hotkey (verified by the guard, clipped) and counted. The reply carries no image
(`image` is cleared), only the prediction.

`--local` runs the same neuron without a chain: the named wallet (a throwaway one when no
`--wallet.*` flag names one), the axon bound to 127.0.0.1, and a guard that admits only the
`--allow-hotkey` callers (signatures still checked).

What it says: one line per answered request or a periodic summary (`miner.request_log`, see
`natix_miner.request_log`); /metrics (`miner.telemetry_port`) exports the engine's metrics, the
answers by outcome, the guard's refusals by reason and the standard `process_*` metrics.
"""

import asyncio
import collections
import math
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import bittensor as bt
from loguru import logger

from cascade.config import CascadeConfig, TierSpec
from cascade.errors import MissingArtifactError
from cascade.tier import Tier
from natix_miner import axon_server, memory, request_context
from natix_miner import guard as guard_mod
from natix_miner.admission import AdmissionGate
from natix_miner.decode import DecodeError, decode_image
from natix_miner.logsafe import clip, quiet_bittensor_axon
from natix_miner.protocol import ExtendedImageSynapse, ImageSynapse, synapse_class
from natix_miner.request_log import RequestLog, short_hotkey
from natix_miner.settings import MinerSettings

LOCAL_HOST = "127.0.0.1"


class NotRegisteredError(RuntimeError):
    """The wallet's hotkey has no uid on the subnet; the message says how to register."""


class WalletError(RuntimeError):
    """The named wallet or hotkey does not exist on disk."""


class ChainUnreachableError(RuntimeError):
    """The subtensor endpoint could not be reached or answered with an error; names the endpoint."""


@dataclass(frozen=True)
class NeuronOptions:
    """What the command line decides (bittensor's flag names, see `natix_miner.commands.serve`)."""

    netuid: int
    network: str = "finney"
    chain_endpoint: Optional[str] = None
    wallet_name: str = "default"
    wallet_hotkey: str = "default"
    wallet_path: str = "~/.bittensor/wallets/"
    # A `--wallet.*` flag named the wallet: `local` then answers as it, not as a throwaway hotkey.
    wallet_named: bool = False
    axon_port: int = 8091
    # Address the axon binds; None = bittensor's default (all interfaces). `--local` forces 127.0.0.1.
    axon_ip: Optional[str] = None
    axon_external_ip: Optional[str] = None
    axon_external_port: Optional[int] = None
    axon_max_workers: int = 10
    local: bool = False
    # Extra admitted callers (added to `miner.guard.allow_hotkeys`).
    allow_hotkeys: tuple[str, ...] = ()
    # Overrides `miner.guard.rate_limit_per_minute` when set; with `local` and no override the
    # limit is off (the operator's own clients query back to back).
    rate_limit_per_minute: Optional[int] = None


def find_missing_artifact(exc: BaseException) -> Optional[MissingArtifactError]:
    """The MissingArtifactError behind `exc`, however deeply the engine wrapped it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MissingArtifactError):
            return exc
        for inner in getattr(exc, "exceptions", ()) or ():  # ExceptionGroup
            found = find_missing_artifact(inner)
            if found is not None:
                return found
        exc = exc.__cause__ or exc.__context__
    return None


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def throwaway_wallet(directory: Path, name: str = "local") -> "bt.Wallet":
    """An unencrypted wallet in `directory`, for chain-free runs and tests only."""
    wallet = bt.Wallet(name=name, hotkey="miner", path=str(directory))
    wallet.create_new_coldkey(use_password=False, overwrite=True, suppress=True)
    wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
    return wallet


class Miner:
    """One miner neuron. `await start()`, serve until told to stop, `await stop()`."""

    def __init__(self, settings: MinerSettings, cascade: CascadeConfig, options: NeuronOptions, *,
                 tier_factory: Optional[Callable[[TierSpec], Tier]] = None,
                 wallet: Optional["bt.Wallet"] = None, subtensor: Any = None) -> None:
        self.settings = settings
        self.cascade = cascade
        self.options = options
        self._tier_factory = tier_factory
        self.wallet = wallet
        self.engine: Any = None
        self.axon: Optional[bt.Axon] = None
        # Injected only by tests (there is no chain to talk to); otherwise built from the options.
        self.subtensor: Any = subtensor
        self.metagraph: Any = None
        self.guard: Optional[guard_mod.Guard] = None
        self.metagraph_sync: Optional[guard_mod.MetagraphSync] = None
        self.shield: Optional[axon_server.Shield] = None
        self.gate = AdmissionGate(settings.max_concurrent_forwards)
        self.counters: collections.Counter = collections.Counter()
        self.forward_calls = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        memory.tune_malloc(settings.malloc_arena_max)  # before the decode and tier threads exist
        self._decode_pool = ThreadPoolExecutor(max_workers=settings.decode_threads,
                                               thread_name_prefix="decode")
        self._tmpdir: Optional[str] = None
        self._resync_task: Optional[asyncio.Task] = None
        self._telemetry: Any = None
        self._summary_task: Optional[asyncio.Task] = None
        self.request_log = RequestLog(settings.request_log, refusals=self._refusals)
        # Which keys answer: "wallet NAME/HOTKEY" or "throwaway wallet" (printed at start).
        self.wallet_source = "injected wallet" if wallet is not None else ""
        self.started = False

    # ----- properties -------------------------------------------------------------------------
    @property
    def hotkey(self) -> str:
        return self.wallet.hotkey.ss58_address

    @property
    def bind_host(self) -> str:
        if self.options.local:
            return LOCAL_HOST
        return (self.options.axon_ip or "0.0.0.0").strip("[]")

    @property
    def address(self) -> str:
        """host:port a client on this machine reaches the axon at."""
        host = LOCAL_HOST if self.bind_host in ("0.0.0.0", "::") else self.bind_host
        return f"{host}:{self.options.axon_port}"

    # ----- lifecycle ------------------------------------------------------------------------------
    def _build_wallet(self) -> "bt.Wallet":
        if self.wallet is not None:
            return self.wallet
        if self.options.local and not self.options.wallet_named:
            self._tmpdir = tempfile.mkdtemp(prefix="natix-local-wallet-")
            self.wallet_source = "throwaway wallet, no --wallet.* flag given"
            return throwaway_wallet(Path(self._tmpdir))
        wallet = bt.Wallet(name=self.options.wallet_name, hotkey=self.options.wallet_hotkey,
                           path=self.options.wallet_path)
        self.wallet_source = f"wallet {self.options.wallet_name}/{self.options.wallet_hotkey}"
        if not wallet.hotkey_file.exists_on_device():
            raise WalletError(
                f"hotkey '{self.options.wallet_hotkey}' of wallet '{self.options.wallet_name}' not "
                f"found under {self.options.wallet_path}; create it with: btcli wallet new-hotkey "
                f"--wallet.name {self.options.wallet_name} --wallet.hotkey {self.options.wallet_hotkey}")
        return wallet

    def _connect_chain(self) -> guard_mod.MetagraphView:
        o = self.options
        network = o.chain_endpoint or o.network
        logger.info("connecting to subtensor {} (netuid {})", network, o.netuid)
        try:
            if self.subtensor is None:
                self.subtensor = bt.Subtensor(network=network)
            registered = self.subtensor.is_hotkey_registered(hotkey_ss58=self.hotkey, netuid=o.netuid)
        except Exception as exc:  # noqa: BLE001 - websockets, DNS, substrate errors: one message
            raise ChainUnreachableError(
                f"cannot reach the chain at {network} ({type(exc).__name__}: {exc}); check "
                f"--subtensor.network / --subtensor.chain_endpoint") from exc
        if not registered:
            raise NotRegisteredError(
                f"hotkey {self.hotkey} (wallet {o.wallet_name}/{o.wallet_hotkey}) is not registered "
                f"on netuid {o.netuid} ({o.network}). Register it first: natix-miner register "
                f"--netuid {o.netuid} --subtensor.network {o.network} --wallet.name {o.wallet_name} "
                f"--wallet.hotkey {o.wallet_hotkey}")
        self.metagraph = self.subtensor.metagraph(o.netuid)
        view = guard_mod.MetagraphView.from_metagraph(self.metagraph)
        logger.info("metagraph synced: {} hotkeys, {} with validator permit", len(view), view.validators)
        return view

    def _guard_settings(self):
        import dataclasses

        g = self.settings.guard
        allow = list(dict.fromkeys([*g.allow_hotkeys, *self.options.allow_hotkeys]))
        changes: dict[str, Any] = {"allow_hotkeys": allow}
        if self.options.rate_limit_per_minute is not None:
            changes["rate_limit_per_minute"] = self.options.rate_limit_per_minute
        elif self.options.local:
            # Local callers are the operator's own test clients, which query back to back.
            changes["rate_limit_per_minute"] = 0
        return dataclasses.replace(g, **changes)

    def _make_engine(self) -> Any:
        from cascade.engine import CascadeEngine

        factory = self._tier_factory
        if factory is None:
            from models.registry import build_tier

            factory = build_tier
        return CascadeEngine(self.cascade, factory, telemetry=self._telemetry)

    async def start(self) -> None:
        """Wallet, chain check, engine warm-up, then the axon: ready only when every tier is."""
        self._loop = asyncio.get_running_loop()
        self.wallet = self._build_wallet()
        if self.options.local:
            view = guard_mod.MetagraphView.empty()
            if not (self.options.allow_hotkeys or self.settings.guard.allow_hotkeys):
                logger.warning("--local without --allow-hotkey: every request will be refused")
        else:
            view = await asyncio.to_thread(self._connect_chain)
        self.guard = guard_mod.Guard(self._guard_settings(), self.hotkey, view)
        if not self.options.local:
            self.metagraph_sync = guard_mod.MetagraphSync(
                self._sync_metagraph, self.guard,
                min_interval_s=self.settings.guard.resync_min_interval_s,
                alert_after=self.settings.metagraph_fail_alert)
        o = self.options
        probe_host = "0.0.0.0" if self.bind_host == "::" else self.bind_host
        if not port_is_free(probe_host, o.axon_port):  # before minutes of model loading
            raise OSError(f"port {o.axon_port} on {self.bind_host} is already in use")
        self._start_telemetry()
        logger.info("answering as {} (hotkey {})", self.wallet_source, self.hotkey)
        self.engine = self._make_engine()
        logger.info("loading and warming up {} tier(s) from {}", len(self.cascade.active_tiers),
                    self.cascade.source)
        await self.engine.start()
        external_ip = LOCAL_HOST if o.local else o.axon_external_ip
        self.axon = bt.Axon(wallet=self.wallet, port=o.axon_port, ip=self.bind_host,
                            external_ip=external_ip, external_port=o.axon_external_port,
                            max_workers=o.axon_max_workers)
        self.axon.fast_config.host = self.bind_host
        axon_server.prepare(self.axon)
        hashed = self.settings.synapse_hash_fields
        guard_mod.attach(self.axon, self.forward, self.guard, synapse_class(ImageSynapse, hashed))
        if self.settings.extended_synapse:
            guard_mod.attach(self.axon, self.forward_extended, self.guard,
                             synapse_class(ExtendedImageSynapse, hashed))
        self.shield = axon_server.harden(self.axon, self.settings)
        self._bt_dropped = quiet_bittensor_axon()
        self.axon.start()
        await self._wait_listening()
        if not o.local:  # announce only an endpoint that already answers
            logger.info("serving axon {} on netuid {}", self.axon, o.netuid)
            await asyncio.to_thread(self.axon.serve, netuid=o.netuid, subtensor=self.subtensor)
            self._resync_task = asyncio.create_task(self._resync_forever(), name="metagraph-resync")
        if self.request_log.mode == "summary":
            self._summary_task = asyncio.create_task(self._summary_forever(), name="request-summary")
        self.started = True
        logger.info("miner ready on {} (hotkey {}, {})", self.address, self.hotkey,
                    "local, no chain" if o.local else f"netuid {o.netuid}")

    async def _wait_listening(self, timeout_s: float = 15.0) -> None:
        host, _, port = self.address.rpartition(":")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection(host, int(port))
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise TimeoutError(f"axon did not start listening on {self.address} within {timeout_s} s")

    def _sync_metagraph(self) -> guard_mod.MetagraphView:
        """One blocking re-sync (run by `MetagraphSync` on its own thread)."""
        self.metagraph.sync(subtensor=self.subtensor)
        view = guard_mod.MetagraphView.from_metagraph(self.metagraph)
        logger.info("metagraph re-synced: {} hotkeys, {} validators", len(view), view.validators)
        return view

    async def _resync_forever(self) -> None:
        """Periodic re-syncs; failures are counted and reported by `MetagraphSync`."""
        while True:
            await asyncio.sleep(self.settings.metagraph_resync_s)
            future = self.metagraph_sync.request(early=False)
            try:
                await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - already logged; the last snapshot stays
                pass

    async def _summary_forever(self) -> None:
        """`miner.request_log: summary`: one line per period, also when nothing came in."""
        while True:
            await asyncio.sleep(self.settings.log_summary_s)
            logger.info(self.request_log.summary())

    def _refusals(self) -> dict[str, int]:
        """Refusal counts by reason: the guard's, plus the HTTP layer's (`http_<reason>`) where
        the neuron has one (an attribute `shield` with a `refused` counter)."""
        out = dict((self.guard.stats().get("refused") or {}) if self.guard is not None else {})
        shield = self.shield
        for reason, count in (dict(getattr(shield, "refused", None) or {})).items():
            out[f"http_{reason}"] = count
        return out

    async def stop(self) -> None:
        """Stop accepting, release the port, stop the engine. Safe to call twice."""
        for task in (self._resync_task, self._summary_task):
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._resync_task = self._summary_task = None
        if self.axon is not None:
            self.axon.stop()
            host, _, port = self.address.rpartition(":")
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and not port_is_free(host, int(port)):
                await asyncio.sleep(0.05)
            self.axon = None
        if self.engine is not None:
            try:
                await self.engine.stop()
            except Exception as exc:  # noqa: BLE001
                logger.warning("engine stop failed: {}", exc)
            self.engine = None
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        if self.metagraph_sync is not None:
            self.metagraph_sync.close()
        if self._telemetry is not None:
            self._telemetry.close()
        if self.subtensor is not None:
            try:
                self.subtensor.close()
            except Exception:  # noqa: BLE001
                pass
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        self.started = False
        logger.info("miner stopped; {}", self.stats())

    def _start_telemetry(self) -> None:
        """One registry for the engine's metrics and the shell's; served only when a port is set."""
        from prometheus_client import (Counter, GCCollector, Histogram, PlatformCollector,
                                       ProcessCollector)

        from cascade.telemetry import Telemetry

        self._telemetry = Telemetry()
        registry = self._telemetry.registry
        self._m_requests = Counter("requests", "Answered requests by outcome", ["outcome"],
                                   namespace="natix_miner", registry=registry)
        self._m_latency = Histogram("forward_seconds", "Forward latency, decode included",
                                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 6, 9),
                                    namespace="natix_miner", registry=registry)
        from natix_miner.shell_metrics import ShellCollector

        registry.register(ShellCollector(self))  # guard, HTTP, admission and metagraph figures
        # The standard process_* (CPU, memory, open fds), python_info and python_gc_* metrics.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        port = self.settings.telemetry_port
        if port is not None:
            try:
                self._telemetry.serve(port)
            except OSError as exc:
                raise OSError(f"the metrics port {port} (miner.telemetry_port in "
                              f"{self.cascade.source}) is already in use ({exc.strerror or exc}); "
                              "pick another port or set it to null") from None

    # ----- the request path -------------------------------------------------------------------
    async def _predict(self, image: Any, deadline_s: float) -> Any:
        """The one seam to the engine: `engine.predict(image)` on the engine's own loop."""
        coro = self.engine.predict(image, deadline_s=deadline_s)
        if asyncio.get_running_loop() is self._loop:
            return await coro
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return await asyncio.wrap_future(future)
        finally:
            future.cancel()

    async def _decode(self, data: str, timeout_s: float) -> tuple[Any, str, str]:
        """(image, "ok", "") or (None, outcome, detail); a decode is not waited for past `timeout_s`."""
        future = asyncio.get_running_loop().run_in_executor(
            self._decode_pool, decode_image, data, self.settings.decode)
        try:
            return await asyncio.wait_for(future, timeout=max(0.001, timeout_s)), "ok", ""
        except DecodeError as exc:
            return None, f"decode_{exc.reason}", exc.detail
        except asyncio.TimeoutError:
            return None, "decode_timeout", f"not decoded within {timeout_s:.2f} s"

    async def forward(self, synapse: ImageSynapse) -> ImageSynapse:
        """Decode off the loop, ask the engine, answer a valid probability no matter what."""
        ctx = request_context.current()
        t0 = time.monotonic()
        arrival = ctx.arrival if ctx is not None else t0
        self.forward_calls += 1
        claimed = synapse.dendrite.hotkey if synapse.dendrite is not None else None
        hotkey = clip(ctx.hotkey if ctx is not None and ctx.hotkey else claimed)
        budget = self.cascade.engine.deadline_ms / 1000.0
        if synapse.timeout:
            budget = min(budget, max(0.5, float(synapse.timeout) - 1.5))
        deadline = arrival + budget
        floor = self.settings.min_engine_budget_ms / 1000.0
        fallback = self.cascade.engine.fallback_probability
        prediction, outcome = fallback, "ok"
        if deadline - t0 < floor:
            outcome = "shed_late"
            logger.debug("request from {} reached the forward {:.2f} s after arrival; answering {}",
                         hotkey, t0 - arrival, fallback)
        elif not await self.gate.acquire(ctx.stake if ctx is not None else 0.0,
                                         deadline - floor - time.monotonic()):
            outcome = "shed_busy"
            logger.debug("no engine slot for {} inside its budget; answering {}", hotkey, fallback)
        else:
            try:
                prediction, outcome = await self._answer(synapse, hotkey, deadline, floor, fallback)
            finally:
                self.gate.release()
        if not (isinstance(prediction, float) and math.isfinite(prediction)
                and 0.0 <= prediction <= 1.0):
            logger.error("engine answered {!r} for {}; replacing with {}", prediction, hotkey, fallback)
            prediction, outcome = fallback, "invalid_engine_answer"
        self.counters[outcome] += 1
        synapse.prediction = prediction
        synapse.image = ""
        elapsed = time.monotonic() - t0
        if self._telemetry is not None:
            self._m_requests.labels(outcome).inc()
            self._m_latency.observe(elapsed)
        # what the validator waits for: from the first byte the process saw, not from forward entry
        self.request_log.answered(self._caller(hotkey), outcome, prediction, time.monotonic() - arrival)
        return synapse

    def _caller(self, hotkey: Optional[str]) -> str:
        """`uid 12 5FHneW…694ty`, or the short hotkey alone for a caller off the metagraph."""
        info = self.guard.view.get(hotkey) if self.guard is not None and hotkey else None
        return f"uid {info.uid} {short_hotkey(hotkey)}" if info is not None else short_hotkey(hotkey)

    async def _answer(self, synapse: ImageSynapse, hotkey: str, deadline: float, floor: float,
                      fallback: float) -> tuple[float, str]:
        """Decode, then the engine with what is left of the budget (holding an engine slot)."""
        decode_s = min(self.settings.decode.timeout_ms / 1000.0, deadline - floor - time.monotonic())
        try:
            image, outcome, detail = await self._decode(synapse.image, decode_s)
        except Exception as exc:  # noqa: BLE001 - never let a request crash the neuron
            logger.exception("decode crashed on a request from {}: {}", hotkey, clip(str(exc), 200))
            return fallback, "decode_error"
        if image is None:
            logger.warning("undecodable image from {}: {}: {}", hotkey, outcome, clip(detail, 200))
            return fallback, outcome
        remaining = deadline - time.monotonic()
        if remaining < floor:
            return fallback, "shed_late"
        try:
            result = await asyncio.wait_for(self._predict(image, remaining), timeout=remaining + 0.25)
        except asyncio.TimeoutError:
            logger.warning("engine missed the {:.2f} s left for {}; answering {}", remaining,
                           hotkey, fallback)
            return fallback, "deadline"
        except Exception as exc:  # noqa: BLE001
            logger.error("engine failed on a request from {}: {}: {}", hotkey, type(exc).__name__,
                         clip(str(exc), 200))
            return fallback, "engine_error"
        return float(result.prob), "engine_fallback" if getattr(result, "fallback", False) else "ok"

    async def forward_extended(self, synapse: ExtendedImageSynapse) -> ExtendedImageSynapse:
        """The `ExtendedImageSynapse` route: the same answer, plus the configured model URL."""
        synapse = await self.forward(synapse)
        synapse.model_url = self.settings.model_url
        return synapse

    def stats(self) -> dict[str, Any]:
        out = {"forward_calls": self.forward_calls, "outcomes": dict(self.counters),
               "guard": self.guard.stats() if self.guard else {}, "admission": self.gate.stats(),
               "http_refused": dict(self.shield.refused) if self.shield is not None else {},
               "memory": memory.snapshot()}
        if self.metagraph_sync is not None:
            out["metagraph"] = self.metagraph_sync.stats()
        return out


async def serve_until(miner: Miner, stop: asyncio.Event,
                      on_ready: Optional[Callable[[], None]] = None,
                      health_every_s: float = 300.0) -> None:
    """Start `miner`, serve until `stop` is set, then stop it (also on errors during start)."""
    try:
        start = asyncio.create_task(miner.start())
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({start, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if start not in done:  # told to stop while loading models
            start.cancel()
            try:
                await start
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            return
        waiter.cancel()
        start.result()
        if on_ready is not None:
            on_ready()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=health_every_s)
            except asyncio.TimeoutError:
                memory.trim()  # hand pages freed since the last health line back to the OS
                logger.info("health: {}", miner.stats())
    finally:
        await miner.stop()


class BackgroundMiner:
    """A miner on its own thread and loop, for the `local` command and tests.

    The same `Miner` and `serve_until` as `serve`; only the thread differs (signals stay with the
    caller's main thread).
    """

    def __init__(self, miner: Miner) -> None:
        self.miner = miner
        self._ready = threading.Event()
        self._done = threading.Event()
        self._error: Optional[BaseException] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._thread = threading.Thread(target=self._run, name="miner", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve_until(self.miner, self._stop, on_ready=self._ready.set)

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of start()
            self._error = exc
        finally:
            self._done.set()
            self._ready.set()

    def start(self, timeout_s: float = 600.0) -> "BackgroundMiner":
        """Start and wait until the axon listens; re-raise whatever stopped it from starting."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop()  # cancel the start-up so the thread, the engine and the port are released
            raise TimeoutError(f"miner not ready after {timeout_s} s")
        if self._error is not None:
            raise self._error
        if self._done.is_set():
            raise RuntimeError("miner exited during start-up")
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None and not self._done.is_set():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)

    def __enter__(self) -> "BackgroundMiner":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
