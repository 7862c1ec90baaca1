"""Shared test fixtures: offline bittensor, throwaway wallets, free loopback ports.

bittensor's `Axon()` and `Dendrite()` look up the machine's public IP over the internet when none
is given; tests run offline, so the lookup is pinned to loopback for the whole session.
"""

import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True, scope="session")
def _offline_external_ip():
    """No test may reach the internet to learn its own IP."""
    try:
        from bittensor.utils import networking
    except ImportError:  # bittensor-free test runs
        yield
        return
    original = networking.get_external_ip
    networking.get_external_ip = lambda: "127.0.0.1"
    try:
        yield
    finally:
        networking.get_external_ip = original


@pytest.fixture
def free_port() -> int:
    """A TCP port nothing listens on right now (127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def make_wallet(tmp_path):
    """Build unencrypted throwaway wallets: `make_wallet("validator")`."""
    from natix_miner.neuron import throwaway_wallet

    def _make(name: str = "wallet"):
        return throwaway_wallet(tmp_path / "wallets", name=name)

    return _make


@pytest.fixture(scope="module")
def hf_offline():
    """Hugging Face hub and datasets offline for a module (tiny models and datasets live on disk)."""
    import os

    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
