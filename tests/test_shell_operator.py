"""What an operator meets: one flag style, the subnet's own launch flags, the named wallet in
--local, errors that name what failed, the request log, /metrics, plain pm2 logs, the pm2 file."""

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bittensor as bt
from natix_miner import cli
from natix_miner.commands import serve, subnet_flags
from natix_miner.neuron import (BackgroundMiner, ChainUnreachableError, Miner, NeuronOptions,
                                throwaway_wallet)
from natix_miner.protocol import ImageSynapse
from natix_miner.settings import MinerSettings, load_settings

ROOT = Path(__file__).resolve().parent.parent
HAZARD = """
miner: {netuid: 72}
artifacts_dir: ./artifacts
tiers:
  - {name: hazard_cues.v1, backend: hazard_cues}
devices: {cpu: {memory_gib: 4}}
"""
# The subnet's own start_miner.sh line (natixnetwork/streetvision-subnet), as miner.env fills it.
SUBNET_LINE = ["--neuron.image_detector", "ViT", "--neuron.image_detector_config", "ViT_roadwork.yaml",
               "--neuron.image_detector_device", "cuda", "--netuid", "72",
               "--subtensor.network", "finney",
               "--subtensor.chain_endpoint", "wss://entrypoint-finney.opentensor.ai:443",
               "--wallet.name", "default", "--wallet.hotkey", "default", "--axon.port", "8091",
               "--blacklist.force_validator_permit", "True", "--logging.debug"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(tmp_path, text: str = HAZARD):
    (tmp_path / "cfg.yaml").write_text(text)
    return load_settings(tmp_path / "cfg.yaml")


def _serve_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.build_parser("serve")
    args, extra = parser.parse_known_args(["serve", *argv])
    args.extra = extra
    return args


def _jpeg_b64() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


async def _query(signer, hotkey: str, port: int) -> ImageSynapse:
    dendrite = bt.Dendrite(wallet=signer)
    info = bt.AxonInfo(version=1, ip="127.0.0.1", port=port, ip_type=4, hotkey=hotkey, coldkey=hotkey)
    try:
        return await dendrite(info, ImageSynapse(image=_jpeg_b64()), timeout=9, deserialize=False)
    finally:
        await dendrite.aclose_session()


# ----- one flag style -------------------------------------------------------------------------
def test_every_command_takes_the_same_config_flag_and_version():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    def leaves(name, p):  # a command with actions of its own (`store export`) is checked per action
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not nested:
            yield name, p
        for a in nested:
            for sub_name, sub_p in a.choices.items():
                yield from leaves(f"{name} {sub_name}", sub_p)

    for name, p in [leaf for n, q in sub.choices.items() for leaf in leaves(n, q)]:
        if name == "store label":  # works on an exported folder, reads no config
            continue
        config = next((a for a in p._actions if "--config" in a.option_strings), None)
        assert config is not None, f"{name} has no --config"
        assert str(config.default) == cli.DEFAULT_CONFIG, (name, config.default)
    for name in ("local", "validate"):
        flags = {o for a in sub.choices[name]._actions for o in a.option_strings}
        assert {"-n", "--split"} <= flags, name
        split = next(a for a in sub.choices[name]._actions if "--split" in a.option_strings)
        assert split.default == "val", name
    validate_flags = {o for a in sub.choices["validate"]._actions for o in a.option_strings}
    assert {"--wallet.name", "--wallet.hotkey", "--wallet.path", "--subtensor.network",
            "--subtensor.chain_endpoint", "--netuid"} <= validate_flags
    assert not {f for f in validate_flags if f.startswith("--wallet-")}
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0


@pytest.mark.parametrize("argv, expected", [
    (["serve", "--axon.port", "70000"], "70000 is not a port"),
    (["local", "--images", ".", "-n", "0"], "must be 1 or more"),
    (["local", "--images", "/no/such/folder"], "not a directory"),
    (["validate", "--axon", "127.0.0.1:1", "--images", ".", "-n", "-3"], "must be 1 or more"),
])
def test_bad_flag_values_exit_2_with_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and expected in err and "Traceback" not in err


def test_local_refuses_an_unusable_folder_before_any_tier_loads(tmp_path, capsys):
    # A tier whose head is missing: if the folder were not checked first, local would train.
    (tmp_path / "cfg.yaml").write_text(HAZARD.replace("hazard_cues.v1, backend: hazard_cues",
                                                      "effnet.h, backend: efficientnet_lite"))
    (tmp_path / "imgs" / "roadwork").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "roadwork" / "a.jpg")
    code = cli.main(["local", "--config", str(tmp_path / "cfg.yaml"), "--images",
                     str(tmp_path / "imgs"), "--split", "all"])
    err = capsys.readouterr().err
    assert code == 2 and "no images of label 0" in err and "Training" not in err


# ----- the subnet's own flags -------------------------------------------------------------------
def test_subnet_flags_are_mapped_or_warned(tmp_path):
    settings, _ = _settings(tmp_path)
    args = _serve_args([*SUBNET_LINE, "--model_url", "https://huggingface.co/me/m",
                        "--neuron.epoch_length", "50", "--blacklist.allow_non_registered",
                        "--wandb.off", "--neuron.some_future_flag", "3"])
    assert subnet_flags.split_extra(args.extra) == (["--neuron.some_future_flag", "3"], [])
    mapped, warnings = subnet_flags.apply_subnet_flags(args, settings, config_path="cfg.yaml",
                                                       extra=args.extra)
    assert mapped.model_url == "https://huggingface.co/me/m"
    assert mapped.metagraph_resync_s == 600.0 and mapped.guard.require_validator_permit
    text = "\n".join(warnings)
    assert "--neuron.image_detector" in text and "cfg.yaml" in text
    assert "--blacklist.allow_non_registered is not honoured" in text
    assert "--neuron.some_future_flag ignored" in text
    assert len(warnings) == 3  # one line per ignored flag (family), none for the mapped ones
    off, warnings = subnet_flags.apply_subnet_flags(
        _serve_args(["--blacklist.force_validator_permit", "false"]), settings, config_path="c")
    assert not off.guard.require_validator_permit and "admitted" in warnings[0]
    bare, _ = subnet_flags.apply_subnet_flags(
        _serve_args(["--blacklist.force_validator_permit", "--logging.debug"]), settings, config_path="c")
    assert bare.guard.require_validator_permit


def test_a_typo_outside_the_subnet_namespaces_is_still_refused(capsys):
    assert serve.run(_serve_args(["--wallet.nmae", "x"])) == 2
    assert "unrecognized arguments: --wallet.nmae x" in capsys.readouterr().err


def test_the_subnets_pm2_line_starts_this_miner(tmp_path):
    """`neurons/miner.py` + start_miner.sh's flags (+ --local so no chain is needed) must serve."""
    (tmp_path / "cfg.yaml").write_text(HAZARD)
    port = _port()
    line = [a if a != "8091" else str(port) for a in SUBNET_LINE]
    line = [a for a in line if a not in ("--wallet.name", "--wallet.hotkey", "default")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "BT_AXON_EXTERNAL_IP": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "neurons" / "miner.py"), *line, "--local",
                             "--config", str(tmp_path / "cfg.yaml")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stdout:  # bittensor's own lines come first; EOF if the miner exits
            seen.append(line)
            if line.startswith("miner ready: axon 127.0.0.1:"):
                break
        assert seen and seen[-1].startswith("miner ready"), (seen, proc.poll())
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
    out, err = "".join(seen) + proc.stdout.read(), proc.stderr.read()
    assert code == 0, err
    assert "--neuron.image_detector (and the other detector flags) ignored" in err
    assert "\x1b[" not in out + err  # no colour codes when stdout/stderr are not terminals


# ----- wallets ------------------------------------------------------------------------------------
async def test_local_answers_as_the_named_wallet(tmp_path):
    """A client signing for the operator's wallet must be answered, not refused."""
    settings, cascade = _settings(tmp_path)
    mine = throwaway_wallet(tmp_path / "w", name="operator")
    client = throwaway_wallet(tmp_path / "w", name="client")
    port = _port()
    options = NeuronOptions(netuid=72, local=True, axon_port=port, wallet_name="operator",
                            wallet_hotkey="miner", wallet_path=str(tmp_path / "w"), wallet_named=True,
                            allow_hotkeys=(client.hotkey.ss58_address,))
    runner = await asyncio.to_thread(BackgroundMiner(Miner(settings, cascade, options)).start, 60)
    try:
        assert runner.miner.hotkey == mine.hotkey.ss58_address
        assert runner.miner.wallet_source == "wallet operator/miner"
        resp = await _query(client, mine.hotkey.ss58_address, port)
        assert resp.dendrite.status_code == 200 and 0.0 <= resp.prediction <= 1.0
    finally:
        await asyncio.to_thread(runner.stop)
    unnamed = Miner(settings, cascade, NeuronOptions(netuid=72, local=True, wallet_name="operator",
                                                     wallet_path=str(tmp_path / "w")))
    assert unnamed._build_wallet().hotkey.ss58_address != mine.hotkey.ss58_address
    assert unnamed.wallet_source.startswith("throwaway")
    unnamed._decode_pool.shutdown()
    shutil.rmtree(unnamed._tmpdir, ignore_errors=True)


def test_wallet_flags_count_as_named_only_when_given(monkeypatch):
    from natix_miner.commands.flags import wallet_from_args

    for var in ("BT_WALLET_NAME", "BT_WALLET_HOTKEY", "BT_WALLET_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert not wallet_from_args(_serve_args(["--local"])).named
    w = wallet_from_args(_serve_args(["--local", "--wallet.path", "/w"]))
    assert w.named and (w.name, w.hotkey, w.path) == ("default", "default", "/w")
    assert serve.options_from_args(_serve_args(["--wallet.name", "op"]), 72).wallet_named


# ----- errors that name what failed ---------------------------------------------------------------
async def test_unreachable_chain_names_the_endpoint(tmp_path, capsys):
    settings, cascade = _settings(tmp_path)
    endpoint = f"ws://127.0.0.1:{_port()}"
    miner = Miner(settings, cascade, NeuronOptions(netuid=72, chain_endpoint=endpoint,
                                                   axon_port=_port(), axon_ip="127.0.0.1"),
                  wallet=throwaway_wallet(tmp_path / "w", name="m"))
    with pytest.raises(ChainUnreachableError) as info:
        await asyncio.to_thread(BackgroundMiner(miner).start, 60)
    assert endpoint in str(info.value) and miner.engine is None
    assert serve.report_start_failure(info.value) == 1
    assert f"cannot reach the chain at {endpoint}" in capsys.readouterr().err


def test_metrics_port_in_use_says_it_is_the_metrics_port(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        settings, cascade = _settings(tmp_path, HAZARD.replace("{netuid: 72}",
                                                               f"{{netuid: 72, telemetry_port: {taken}}}"))
        code = serve.serve(settings, cascade, NeuronOptions(netuid=72, local=True, axon_port=_port()))
    err = capsys.readouterr().err
    assert code == 1 and f"the metrics port {taken} (miner.telemetry_port" in err


# ----- what a live miner says -------------------------------------------------------------------
def test_request_log_line_and_summary():
    from loguru import logger

    from natix_miner.request_log import RequestLog

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    try:
        RequestLog("line").answered("uid 3 5FHneW…694ty", "ok", 0.87312, 0.1423)
        assert lines == ["answered uid 3 5FHneW…694ty: 0.8731 ok in 142 ms"]
        refused = {"no_permit": 2}
        now = [0.0]
        log = RequestLog("summary", refusals=lambda: dict(refused), clock=lambda: now[0])
        for ms in (100, 200, 300):
            log.answered("a" if ms < 300 else "b", "ok" if ms < 300 else "deadline", 0.5, ms / 1e3)
        refused.update(no_permit=5, rate_limited=1)
        now[0] = 60.0
        assert len(lines) == 1  # summary mode: no per-request line
        assert log.summary() == ("last 60 s: 3 answered (ok 2, deadline 1), p50 200 ms, "
                                 "p99 298 ms, 2 callers; refused 4 (no_permit 3, rate_limited 1)")
        now[0] = 120.0
        assert log.summary() == "last 60 s: 0 answered; refused 0"
        RequestLog("off").answered("a", "ok", 0.5, 0.1)
        assert len(lines) == 1
    finally:
        logger.remove(sink)
    with pytest.raises(ValueError):
        RequestLog("verbose")


def test_request_log_mode_is_validated(tmp_path):
    from cascade.errors import ConfigError

    with pytest.raises(ConfigError, match="miner.request_log"):
        _settings(tmp_path, HAZARD.replace("{netuid: 72}", "{netuid: 72, request_log: loud}"))
    assert MinerSettings().request_log == "line"


async def test_metrics_export_refusals_answers_tiers_and_process(tmp_path):
    import aiohttp
    from loguru import logger

    tport = _port()
    settings, cascade = _settings(tmp_path, HAZARD.replace("{netuid: 72}",
                                                           f"{{netuid: 72, telemetry_port: {tport}}}"))
    client = throwaway_wallet(tmp_path / "w", name="client")
    stranger = throwaway_wallet(tmp_path / "w", name="stranger")
    port = _port()
    miner = Miner(settings, cascade, NeuronOptions(netuid=72, local=True, axon_port=port,
                                                   allow_hotkeys=(client.hotkey.ss58_address,)))
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    runner = await asyncio.to_thread(BackgroundMiner(miner).start, 60)
    try:
        assert (await _query(client, miner.hotkey, port)).dendrite.status_code == 200
        assert (await _query(stranger, miner.hotkey, port)).prediction == -1.0
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{tport}/metrics") as r:
                text = await r.text()
    finally:
        await asyncio.to_thread(runner.stop)
        logger.remove(sink)
    assert 'natix_miner_requests_total{outcome="ok"} 1.0' in text          # answers by outcome
    assert "natix_miner_guard_refusals_total{reason=" in text               # refusals by reason
    assert "natix_miner_guard_admitted_total 1.0" in text
    assert 'cascade_tier_latency_seconds_count{tier="hazard_cues.v1"} 1.0' in text
    assert 'cascade_tier_breaker_state{tier="hazard_cues.v1"} 0.0' in text
    assert "process_cpu_seconds_total" in text and "process_resident_memory_bytes" in text
    short = f"{client.hotkey.ss58_address[:6]}…{client.hotkey.ss58_address[-5:]}"
    assert any(line.startswith(f"answered {short}: ") and line.endswith(" ms") and " ok in " in line
               for line in lines), lines


def test_log_file_and_plain_bittensor_lines(tmp_path):
    """--logging.logging_dir writes a file; bittensor's own lines carry no colour codes in a pipe."""
    code = ("import argparse, time, bittensor as bt; from loguru import logger; "
            "from natix_miner.commands.serve import configure_logging; "
            f"configure_logging(argparse.Namespace(**{{'logging.logging_dir': {str(tmp_path)!r}}})); "
            "bt.logging.warning('from bittensor [red]red[/red]'); logger.info('from loguru'); "
            "time.sleep(0.3)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "from bittensor" in res.stdout and "from loguru" in res.stderr, res
    assert "\x1b[" not in res.stdout + res.stderr
    assert "from loguru" in (tmp_path / "natix-miner.log").read_text()


# ----- pm2 --------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("env", [
    {"NATIX_WALLET": "miner", "NATIX_HOTKEY": "hk", "NATIX_WALLET_PATH": "/keys",
     "NATIX_CHAIN_ENDPOINT": "ws://127.0.0.1:9944", "NATIX_NETWORK": "test", "NATIX_NETUID": "323"},
    {"NATIX_LOCAL": "1", "NATIX_ALLOW_HOTKEY": "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"},
    {"NATIX_LOCAL": "1", "NATIX_WALLET": "miner"},
])
def test_pm2_file_arguments_are_serve_flags(env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NATIX_")}
    res = subprocess.run(["node", "-e", "console.log(JSON.stringify(require("
                          "'./scripts/pm2/ecosystem.config.js').apps))"],
                         cwd=ROOT, capture_output=True, text=True, env={**clean, **env}, timeout=30)
    apps = json.loads(res.stdout)
    assert len(apps) == 1
    app = apps[0]
    assert app["script"].endswith("neurons/miner.py") and app["interpreter"].endswith(".venv/bin/python")
    assert app["max_restarts"] > 0 and app["min_uptime"] and app["env"]["NO_COLOR"] == "1"
    args = _serve_args(app["args"])
    assert args.extra == []
    if env.get("NATIX_LOCAL"):
        assert app["name"] == "natix-miner-local" and args.local
        assert getattr(args, "wallet.name") == env.get("NATIX_WALLET")
        assert args.allow_hotkey == ([env["NATIX_ALLOW_HOTKEY"]] if "NATIX_ALLOW_HOTKEY" in env else [])
    else:
        assert app["name"] == "natix-miner" and not args.local
        assert getattr(args, "wallet.path") == "/keys" and getattr(args, "wallet.hotkey") == "hk"
        assert getattr(args, "subtensor.chain_endpoint") == "ws://127.0.0.1:9944"
        assert args.netuid == 323 and getattr(args, "subtensor.network") == "test"


def test_refusals_merge_the_guard_and_the_http_layer(tmp_path):
    import collections
    import types

    from natix_miner import guard as guard_mod
    from natix_miner.settings import GuardSettings

    settings, cascade = _settings(tmp_path)
    miner = Miner(settings, cascade, NeuronOptions(netuid=72, local=True))
    try:
        assert miner._refusals() == {}
        miner.guard = guard_mod.Guard(GuardSettings(), "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty")
        miner.guard.refused["no_permit"] += 2
        miner.shield = types.SimpleNamespace(refused=collections.Counter(body_too_large=1))
        assert miner._refusals() == {"no_permit": 2, "http_body_too_large": 1}
    finally:
        miner._decode_pool.shutdown()


async def test_summary_mode_logs_one_line_per_period_even_when_idle(tmp_path):
    from loguru import logger

    settings, cascade = _settings(tmp_path, HAZARD.replace(
        "{netuid: 72}", "{netuid: 72, request_log: summary, log_summary_s: 0.2}"))
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    runner = await asyncio.to_thread(BackgroundMiner(Miner(settings, cascade, NeuronOptions(
        netuid=72, local=True, axon_port=_port()))).start, 60)
    try:
        await asyncio.sleep(0.7)
    finally:
        await asyncio.to_thread(runner.stop)
        logger.remove(sink)
    summaries = [line for line in lines if line.startswith("last ")]
    assert len(summaries) >= 2 and summaries[0].endswith("0 answered; refused 0"), lines


def test_a_missing_wallet_is_an_input_error(capsys):
    from natix_miner.neuron import WalletError

    assert serve.report_start_failure(WalletError("hotkey 'x' of wallet 'y' not found")) == 2
    assert "not found" in capsys.readouterr().err
