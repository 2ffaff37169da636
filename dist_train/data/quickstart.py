"""The embedded quickstart dataset, built from text every Python installation carries.

Corpus (unlabeled): the language reference topics of `pydoc_data.topics` plus the docstrings
of a fixed list of standard-library modules. Task (labeled): the first paragraph of each
public function's or class's docstring, labeled with its module family (text, files, math,
network, concurrency, formats). A byte-level BPE tokenizer is trained on the corpus. Nothing is
downloaded; the result depends only on the Python version's standard library.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from pathlib import Path

from dist_train import owned

FAMILIES: dict[str, list[str]] = {
    "text": ["string", "re", "textwrap", "difflib", "unicodedata", "locale", "gettext", "codecs"],
    "files": ["os", "os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp", "stat",
              "fileinput", "io"],
    "math": ["math", "cmath", "decimal", "fractions", "random", "statistics", "numbers"],
    "network": ["socket", "ssl", "http.client", "http.server", "http.cookies", "urllib.request",
                "urllib.parse", "smtplib", "ftplib", "poplib", "imaplib", "email.message", "email.utils",
                "ipaddress", "socketserver", "xmlrpc.client"],
    "concurrency": ["threading", "multiprocessing", "concurrent.futures", "asyncio", "queue",
                    "subprocess", "sched", "contextvars", "signal", "selectors"],
    "formats": ["json", "csv", "pickle", "xml.etree.ElementTree", "configparser", "zipfile", "tarfile",
                "gzip", "bz2", "lzma", "base64", "binascii", "struct", "plistlib", "html.parser",
                "sqlite3", "zlib"],
}
READY = "READY.json"
KIND = "quickstart data"
VERSION = 2
SFT_PROMPT = "Which part of the Python standard library does this describe?\n{text}\nAnswer:"
ENTITY_LITERALS = {"True", "False", "None"}
# Module names that are also everyday words in docstrings ("a string", "a random number") are not tagged.
COMMON_WORDS = {"string", "re", "random", "numbers", "stat", "io", "glob", "queue", "signal", "locale", "math"}


def _docs(module_name: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) for a module, its public members and their methods."""
    try:
        mod = importlib.import_module(module_name)
    except ImportError:
        return []
    out = [(module_name, inspect.getdoc(mod) or "")]
    for name in sorted(dir(mod)):
        if name.startswith("_"):
            continue
        obj = getattr(mod, name, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        out.append((f"{module_name}.{name}", inspect.getdoc(obj) or ""))
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                if not meth.startswith("_") and inspect.isroutine(vars(obj)[meth]):
                    out.append((f"{module_name}.{name}.{meth}", inspect.getdoc(vars(obj)[meth]) or ""))
    return [(q, d) for q, d in out if d.strip()]


def collect() -> tuple[list[str], list[dict[str, str]]]:
    """The corpus documents and the labeled examples (deduplicated, label-unambiguous)."""
    import pydoc_data.topics

    corpus = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    seen: dict[str, set[str]] = {}
    for family, modules in FAMILIES.items():
        for module_name in modules:
            for _, doc in _docs(module_name):
                corpus.append(doc)
                first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
                if len(first.split()) >= 4:
                    seen.setdefault(first, set()).add(family)
    # A paragraph shared by two families (e.g. inherited docs) has no single right label.
    examples = [{"text": t, "label": next(iter(f))} for t, f in sorted(seen.items()) if len(f) == 1]
    return list(dict.fromkeys(corpus)), examples


def _word_tags(text: str, modules: set[str]) -> dict[str, list[str]]:
    """Words of a docstring paragraph tagged BIO: standard-library module names (MODULE, e.g.
    `os.path`, `socket`) and the literals True/False/None (LITERAL); everything else O."""
    words = text.split()
    tags = []
    for w in words:
        core = w.strip(".,;:()[]'\"`")
        tags.append("B-MODULE" if core in modules else "B-LITERAL" if core in ENTITY_LITERALS else "O")
    return {"tokens": words, "tags": tags}


def write_tasks(out: Path, examples: list[dict[str, str]]) -> None:
    """The labeled quickstart tasks: classification (task/), SFT prompt/response pairs asking for
    the family (task/sft_*.jsonl) and tagging of module names and literals (task/ner_*.jsonl)."""
    modules = {m for mods in FAMILIES.values() for m in mods} - COMMON_WORDS
    for split in ("train", "validation", "test"):
        rows = [ex for ex in examples if _split(ex["text"]) == split]
        with open(out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(ex) + "\n" for ex in rows)
        with open(out / f"sft_{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": SFT_PROMPT.format(text=ex["text"]), "response": " " + ex["label"]})
                         + "\n" for ex in rows)
        with open(out / f"ner_{split}.jsonl", "w") as f:
            f.writelines(json.dumps(_word_tags(ex["text"], modules)) + "\n" for ex in rows)


def _split(text: str) -> str:
    bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def _earlier(root: Path) -> bool:
    """Quickstart data from a version before ownership markers: it has the READY file."""
    return (root / READY).is_file()


def check_prepare_dir(root: str | Path) -> None:
    """Raise OwnershipError unless prepare.dir may be (re)filled with the quickstart data: it must be new,
    empty, or quickstart data dist-train prepared before (a folder of the user's is never replaced)."""
    owned.check_output(Path(root), KIND, legacy=_earlier, what="prepare.dir")


def prepare_python_docs(root: str | Path, *, seq_len: int, vocab_size: int, seed: int = 0,
                        progress: bool = True, tokenizer: str | None = None) -> Path:
    """Materialize the quickstart data under `root` (once; a READY marker makes it idempotent).

    Layout: corpus.jsonl, tokenizer/ (unless `tokenizer` names one to use instead), shards/
    (with manifest.json), task/{,sft_,ner_}{train,validation,test}.jsonl.
    """
    from dist_train.data.build import build_shards
    from dist_train.data.tokenizer import train_tokenizer

    root = Path(root)
    stamp = {"version": VERSION, "seq_len": seq_len, "vocab_size": vocab_size, "seed": seed, "tokenizer": tokenizer}
    ready = root / READY
    if ready.is_file() and json.loads(ready.read_text()) == stamp:
        return root
    check_prepare_dir(root)
    tmp = owned.temp_beside(root)
    try:
        (tmp / "task").mkdir()
        corpus, examples = collect()
        with open(tmp / "corpus.jsonl", "w") as f:
            for doc in corpus:
                f.write(json.dumps({"text": doc}) + "\n")
        write_tasks(tmp / "task", examples)
        if tokenizer is None:
            train_tokenizer(corpus, vocab_size, tmp / "tokenizer", "bpe")
        build_shards(input_spec=str(tmp / "corpus.jsonl"), output=tmp / "shards",
                     tokenizer_name=tokenizer or str(tmp / "tokenizer"), seq_len=seq_len, samples_per_shard=256,
                     val_fraction=0.05, seed=seed, progress=progress,
                     tokenizer_label=tokenizer or str(root / "tokenizer"))
        (tmp / READY).write_text(json.dumps(stamp))
        owned.replace(tmp, root, KIND, legacy=_earlier, what="prepare.dir")
    finally:
        owned.discard(tmp)
    return root
