"""`python -m bench <name> [--json OUT]`: run one benchmark, print its table, optionally write JSON."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

BENCHES = {"data": "bench.data", "memory": "bench.memory"}


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
    ap.add_argument("--markdown", help="update this benchmark's section of a markdown file (docs/benchmarks.md)")
    ap.add_argument("--render", metavar="JSON", help="only re-render the markdown from earlier results")
    args = ap.parse_args()
    module = __import__(BENCHES[args.name], fromlist=["run"])
    if args.render:
        results = json.loads(Path(args.render).read_text())
    else:
        results = {"machine": machine(), "bench": args.name, **module.run(repeats=args.repeats)}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        update_section(Path(args.markdown), args.name, module.markdown(results))


def update_section(path: Path, name: str, body: str) -> None:
    """Replace the text between <!-- bench:NAME --> markers (appended when absent)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    header = "# Benchmarks\n\nRegenerate a section with `python -m bench NAME --markdown docs/benchmarks.md`.\n"
    text = path.read_text() if path.is_file() else header
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
