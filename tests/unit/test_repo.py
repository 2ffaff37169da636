"""The README's two commands stay what CI runs, and the shipped configs stay valid."""

import re
from pathlib import Path

from dist_train.config.loader import load_config

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_exactly_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert "dist-train run configs/quickstart.yaml" in cmds[0] and "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    assert readme_commands()[1] in (REPO / ".ci" / "run").read_text().splitlines()


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_every_example_config_is_valid():
    from dist_train.config.checks import resolve_paths
    from dist_train.config.derived import derive_stage
    from dist_train.config.loader import load_config
    from dist_train.config.schema import STAGES

    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        cfg = resolve_paths(load_config(path))
        for stage in STAGES:
            if getattr(cfg, stage) is not None:
                derive_stage(cfg, stage)


def test_documentation_links_point_at_files_that_exist():
    """Every relative link of the README and docs/ names a file of the repository (anchors aside)."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken
    index = (REPO / "docs" / "README.md").read_text()
    unlisted = [p.name for p in (REPO / "docs").glob("*.md") if p.name != "README.md" and f"({p.name})" not in index]
    assert not unlisted, f"docs/README.md does not list {unlisted}"


def test_the_test_command_collects_every_tier():
    """`pytest` with no arguments (the README's command) must reach unit/, dist/ and integration/: pytest's
    default norecursedirs skips directories named "dist", which once kept the DeepSpeed tier out of CI."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    files = {line.split("::")[0] for line in res.stdout.splitlines() if "::" in line}
    tiers = {f.split("/")[1] for f in files if f.startswith("tests/")}
    assert tiers == {"unit", "dist", "integration"}, res.stdout[-2000:] + res.stderr[-2000:]
    on_disk = {str(p.relative_to(root)) for p in (root / "tests").rglob("test_*.py")}
    assert on_disk == files, "every test file is collected"


def test_every_config_a_script_or_page_names_exists():
    """A config named in the README, docs, launch recipes, Slurm script or another config is shipped
    (configs/my_*.yaml stand for the reader's own)."""
    texts = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "launch").iterdir(),
             *(REPO / "slurm").iterdir(), *(REPO / "configs").glob("*.yaml")]
    named = {(p.name, m) for p in texts if p.is_file()
             for m in re.findall(r"configs/[A-Za-z0-9_./-]+?\.yaml", p.read_text())}
    missing = sorted(f"{page}: {m}" for page, m in named if not (REPO / m).is_file() and "/my_" not in m)
    assert not missing, missing


def test_the_quickstart_time_is_stated_once_the_same_way():
    readme = re.search(r"~(\d+) min\S* on 2 CPU cores", (REPO / "README.md").read_text())
    config = re.search(r"~(\d+) min\S* on 2 CPU cores", (REPO / "configs" / "quickstart.yaml").read_text())
    assert readme and config and readme.group(1) == config.group(1)


def test_ruff_passes():
    """The lint gate: CI runs the tests, so `ruff check` (pyproject.toml's rules) runs with them."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    res = subprocess.run([ruff, "check", "--no-cache", "dist_train", "tests", "bench"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]
