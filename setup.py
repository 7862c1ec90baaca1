"""Packaging for the NATIX StreetVision (subnet 72) miner."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    reqs = (ln.split("#", 1)[0].strip() for ln in lines)  # whole-line and trailing comments
    return [r for r in reqs if r]


setup(
    name="natix-miner",
    version="0.1.0",
    description="Roadwork miner for Bittensor subnet 72 (NATIX StreetVision) with a model cascade",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["natix_miner", "natix_miner.*", "cascade", "cascade.*",
                                    "models", "models.*", "neurons"]),
    install_requires=_requirements(),
    extras_require={
        "test": ["pytest>=8", "pytest-asyncio>=0.23", "pytest-timeout>=2.3"],
        # btcli, which `natix-miner register` runs for the on-chain registration.
        "btcli": ["bittensor-cli>=9"],
        # GPU-only backends; never needed by the core or the tests. Install them through
        # constraints-gpu.txt (one vLLM release and the torch it was built against).
        "gpu": ["ultralytics>=8.3", "vllm>=0.10"],
    },
    entry_points={"console_scripts": ["natix-miner=natix_miner.cli:main"]},
)
