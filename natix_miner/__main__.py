import sys

from natix_miner.cli import main

sys.exit(main())
