"""The attack suite's short run (`scripts/attack.py --preset ci`) against this checkout's miner.

A real `natix-miner serve --local` child process on 127.0.0.1 (hazard-cue tier), attacked with
600 fuzz requests of every category, the signature and replay games, a burst of 40, 15 slow
clients and a 15 s soak. What must hold on any machine: the miner survives, never answers
anything but a finite probability in [0, 1], never answers later than 9 s, never answers 5xx,
drops every slow client, wins every game, and does not keep the memory its hostile inputs cost.
Latency and memory figures beyond that belong to the long run (docs/operator.md).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.attack
@pytest.mark.timeout(400)
def test_the_short_attack_run_holds(tmp_path):
    out = tmp_path / "attack.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "attack.py"), "--preset", "ci",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=380)
    assert out.exists(), proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    report = "\n".join(result["summary"]) + "\n" + proc.stdout[-3000:]
    total = result["rows"][-1]
    assert result["alive"] and result["exit_code"] == 0 and total["crashes"] == 0, report
    assert total["invalid"] == 0 and total["over_9s"] == 0, report
    assert total["server_errors"] == 0 and total["conn_errors"] == 0, report
    verdicts = result["notes"]["games"]["verdicts"]
    assert verdicts and all(v == "held" for v in verdicts.values()), verdicts
    assert result["notes"]["slow"]["still_open"] == 0, report
    fuzz = result["notes"]["fuzz"]["status_by_category"]
    assert set(fuzz["route:base_synapse_fresh_key"]) == {"404"}, fuzz
    assert all(set(v) <= {"200"} for k, v in fuzz.items() if k.startswith("image:")), fuzz
    # Coarse: hostile decodes must not leave their memory behind (the old miner ended at 4x).
    assert result["end"]["rss_mib"] < 1.75 * result["start"]["rss_mib"], report
