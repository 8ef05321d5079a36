"""Start-up time of the store-only commands (`logs`, `sessions`), against a bare Python and a command
that loads the model stack, each as a fresh process, the way a user runs them.

    .venv/bin/python scripts/startup_bench.py                  # this checkout
    .venv/bin/python scripts/startup_bench.py --tree /tmp/old  # another streamchat tree, to compare

The store gets a few logged turns first (no model: rows written through the store), so `logs` has
something to print. Prints the median and min wall time of --runs runs per command and, last, one
line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "streamchat logs": ["-m", "streamchat", "logs"],
    "streamchat sessions": ["-m", "streamchat", "sessions"],
    "streamchat logs path": ["-m", "streamchat", "logs", "path"],
    "streamchat ask --help (loads torch)": ["-m", "streamchat", "ask", "--help"],
}


def seed(tree: Path, home: Path, env: dict) -> None:
    code = (
        "from streamchat.store import Store\n"
        "with Store() as s:\n"
        "    row = s.create_session(video_path='/v.mp4', video_sha256='0'*64, model_id='tiny-random', config={}, history='drop')\n"
        "    for i in range(20):\n"
        "        s.log_turn(row['id'], question=f'q{i}?', answer='an answer', token_ids=[1, 2], at_s=float(i))\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1], help="streamchat source tree (default: this checkout)")
    ap.add_argument("--runs", type=int, default=7, help="runs per command (default: 7)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(args.tree), "STREAMCHAT_HOME": tmp, "HF_HUB_OFFLINE": "1"}
        seed(args.tree, Path(tmp), env)
        results = {}
        for label, argv in COMMANDS.items():
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                done = subprocess.run([sys.executable, *argv], cwd=tmp, env=env, capture_output=True)
                times.append(time.perf_counter() - t0)
                if done.returncode not in (0,):
                    times = None
                    break
            results[label] = None if times is None else {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3)}
            shown = "failed (not in this tree?)" if times is None else f"median {results[label]['median_s']:.3f} s, min {results[label]['min_s']:.3f} s"
            print(f"{label:<40} {shown}")
    print(json.dumps({"tree": str(args.tree), "runs": args.runs, "results": results}))


if __name__ == "__main__":
    main()
