"""`python -m bench <name> [--json OUT]`: run one benchmark, print its table, optionally write JSON."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

BENCHES = {"data": "bench.data"}


def machine() -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "cpu_count": __import__("os").cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": _cpu_name()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("name", choices=sorted(BENCHES))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    args = ap.parse_args()
    module = __import__(BENCHES[args.name], fromlist=["run"])
    results = {"machine": machine(), "bench": args.name, **module.run(repeats=args.repeats)}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
