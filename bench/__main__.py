"""`python -m bench <name> [--json OUT]`: run one benchmark, print its table, optionally write JSON."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

BENCHES = {"throughput": "bench.throughput", "finetune": "bench.finetune", "mfu": "bench.mfu", "data": "bench.data",
           "memory": "bench.memory"}


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


RESULTS = Path(__file__).resolve().parent / "results"
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description="Run benchmarks; `all` runs every one and "
                                 "regenerates docs/benchmarks.md (and bench/results/*.json).")
    ap.add_argument("name", choices=["all", *BENCHES])
    ap.add_argument("--json", help="write the results here (one benchmark)")
    ap.add_argument("--repeats", type=int, help="runs per measurement; the median is reported "
                    "(default: each benchmark's own)")
    ap.add_argument("--markdown", help="update this benchmark's section of a markdown file (docs/benchmarks.md)")
    ap.add_argument("--render", metavar="JSON", help="only re-render the markdown from earlier results "
                    "(with `all`: from bench/results/)", nargs="?", const="")
    args = ap.parse_args()
    if args.name == "all":
        t0 = time.perf_counter()
        for name in BENCHES:
            source = (RESULTS / f"{name}.json") if args.render is not None else None
            one(name, args.repeats, RESULTS / f"{name}.json", DOC, source)
        print(f"all benchmarks: {time.perf_counter() - t0:.0f} s; {DOC} updated")
        return
    one(args.name, args.repeats, Path(args.json) if args.json else None,
        Path(args.markdown) if args.markdown else None, Path(args.render) if args.render else None)


def one(name: str, repeats: int | None, json_out: Path | None, markdown: Path | None, source: Path | None) -> dict:
    """Run (or, from `source`, re-render) one benchmark; write its JSON and markdown section."""
    module = __import__(BENCHES[name], fromlist=["run"])
    if source is not None:
        results = json.loads(source.read_text())
    else:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        measured = module.run(repeats=repeats) if repeats else module.run()
        results = {"machine": machine(), "bench": name, "wall_s": time.perf_counter() - t0, **measured}
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=1) + "\n")
    if markdown is not None:
        update_section(markdown, name, module.markdown(results))
    return results


def update_section(path: Path, name: str, body: str) -> None:
    """Replace the text between <!-- bench:NAME --> markers (appended when absent)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    header = "# Benchmarks\n\nRegenerate this page with `python -m bench all`.\n"
    text = path.read_text() if path.is_file() else header
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
