"""Process entry point pm2 runs: `python neurons/miner.py --netuid 72 --wallet.name ... --wallet.hotkey ...`.

Thin on purpose: the same flags and code as `natix-miner serve` (natix_miner/commands/serve.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from natix_miner.commands.serve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
