"""The serving path stays small: `serve` and `neurons/miner.py` never import the offline toolkit
(nor OpenCV, which only the toolkit's validator image pipeline needs)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The toolkit, and what only it needs (scikit-learn behind its metrics and calibrate's isotonic
# fit, OpenCV behind the validators' image pipeline), stay off the serving path.
CHECK = ("bad = sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'cv2') or "
         "m == 'natix_miner.toolkit' or m.startswith('natix_miner.toolkit.')); print(bad); "
         "sys.exit(1 if bad else 0)")


@pytest.mark.parametrize("entry", [
    # what `natix-miner serve ...` loads before it runs
    "import sys; from natix_miner import cli; cli.build_parser('serve'); "
    "import natix_miner.neuron, natix_miner.guard, natix_miner.decode, natix_miner.settings",
    # what pm2's `python neurons/miner.py` loads
    "import sys, runpy; sys.argv = ['miner']; runpy.run_path('neurons/miner.py', run_name='not_main'); "
    "import natix_miner.neuron",
])
def test_serving_path_imports_no_toolkit(entry: str) -> None:
    res = subprocess.run([sys.executable, "-c", f"{entry}; {CHECK}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_cli_help_still_lists_every_command() -> None:
    from natix_miner import cli
    text = cli.build_parser().format_help()
    for name in cli.COMMANDS:
        assert name in text
