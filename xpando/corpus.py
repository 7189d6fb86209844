"""Default corpora for offline expert nodes, built from documentation already installed.

A node without an API key answers by retrieval over a corpus. The default corpora are made of the
docstrings of installed Python packages (the standard library, ``temporalio``, FastAPI and friends,
``solana``), so ``xpando dev`` works without internet access or downloads.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import inspect
import io
import pkgutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from xpando.retrieval import Passage, save_passages

__all__ = [
    "DEV_DOMAINS",
    "DomainSpec",
    "build_docstring_corpus",
    "ensure_domain_corpus",
]

MIN_PASSAGE_CHARS = 40

# Modules that print, open windows, start interpreters or are otherwise unsafe or useless to import.
_SKIP_NAMES: frozenset[str] = frozenset(
    {
        "__main__",
        "antigravity",
        "this",
        "idlelib",
        "tkinter",
        "pydoc_data",
        "lib2to3",
        "ensurepip",
        "venv",
        "test",
        "tests",
        "testing_utils",
        "conftest",
        "setup",
    }
)
# "testing" is deliberately allowed: temporalio.testing is public, documented API.


@dataclass(frozen=True)
class DomainSpec:
    """A knowledge domain a dev node can serve, and the packages its corpus is built from.

    ``exclude`` lists dotted module prefixes left out of the corpus (generated code, internals).
    """

    name: str
    description: str
    modules: tuple[str, ...]
    exclude: tuple[str, ...] = ()


DEV_DOMAINS: dict[str, DomainSpec] = {
    spec.name: spec
    for spec in (
        DomainSpec(
            "python",
            "The Python standard library: concurrency, files and paths, text, data formats, "
            "networking",
            (
                "asyncio",
                "pathlib",
                "json",
                "collections",
                "itertools",
                "functools",
                "re",
                "datetime",
                "subprocess",
                "logging",
                "sqlite3",
                "csv",
                "dataclasses",
                "typing",
                "http",
                "urllib",
                "shutil",
                "os",
                "contextlib",
                "concurrent",
                "threading",
                "queue",
                "socket",
                "ssl",
                "io",
                "tempfile",
                "glob",
                "textwrap",
                "string",
                "enum",
                "argparse",
                "zipfile",
                "tarfile",
                "hashlib",
                "base64",
                "uuid",
                "email",
            ),
        ),
        DomainSpec(
            "temporal",
            "Temporal durable execution with the temporalio Python SDK: workflows, activities, "
            "workers, clients, retries, signals, queries",
            ("temporalio",),
            # protobuf messages and generated RPC stubs: thousands of one-line docstrings
            exclude=("temporalio.api", "temporalio.bridge"),
        ),
        DomainSpec(
            "web-api",
            "Building HTTP APIs in Python: FastAPI, Starlette, pydantic models and validation, "
            "httpx, uvicorn",
            ("fastapi", "starlette", "pydantic", "httpx", "uvicorn"),
            # pydantic 1 compatibility layers would answer with outdated APIs
            exclude=("pydantic.v1", "pydantic.deprecated"),
        ),
        DomainSpec(
            "solana",
            "Solana blockchain programming in Python: solana-py, solders, SPL tokens, "
            "transactions, keypairs, RPC",
            ("solana", "solders", "spl"),
        ),
    )
}


# --- importing safely ----------------------------------------------------------------------------


def _skipped(dotted: str, exclude: Sequence[str] = ()) -> bool:
    if any(dotted == prefix or dotted.startswith(f"{prefix}.") for prefix in exclude):
        return True
    for part in dotted.split("."):
        if part.startswith("_") or part in _SKIP_NAMES:
            return True
        if part.startswith(("test_", "turtle")) or part.endswith(("_test", "_pb2", "_pb2_grpc")):
            return True
    return False


def _quiet_import(name: str) -> ModuleType | None:
    """Import ``name`` with output and warnings suppressed; ``None`` if it fails in any way."""
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException as exc:  # SystemExit, ImportError, anything a module may raise
        if isinstance(exc, KeyboardInterrupt):
            raise
        return None


def _walk_modules(top: str, exclude: Sequence[str] = ()) -> Iterator[ModuleType]:
    """``top`` and its public submodules, depth first in name order; failing ones are skipped."""
    if _skipped(top, exclude):
        return
    module = _quiet_import(top)
    if module is None:
        return
    yield module
    path = getattr(module, "__path__", None)
    if path is None:
        return
    try:
        children = sorted(
            info.name for info in pkgutil.iter_modules(list(path), prefix=f"{module.__name__}.")
        )
    except Exception:
        return
    for child in children:
        if not _skipped(child, exclude):
            yield from _walk_modules(child, exclude)


# --- docstrings ----------------------------------------------------------------------------------


def _clean_doc(obj: object) -> str:
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return ""
    return inspect.cleandoc(doc).strip()


def _is_autogenerated(cls: type, doc: str) -> bool:
    # dataclasses and namedtuples write "Name(field: type, ...)" when a class has no docstring
    return doc.startswith(f"{cls.__name__}(")


def _member_docs(cls: type, qualname: str) -> Iterator[tuple[str, str]]:
    for name, raw in list(vars(cls).items()):
        if name.startswith("_"):
            continue
        value: object = raw
        if isinstance(raw, staticmethod | classmethod):
            value = raw.__func__
        elif isinstance(raw, property):
            value = raw.fget
        if not (inspect.isroutine(value) or isinstance(raw, property)):
            continue
        doc = _clean_doc(raw if isinstance(raw, property) else value)
        if doc:
            yield f"{qualname}.{name}", doc


def _documented_here(obj: object, modname: str) -> bool:
    """Whether ``obj`` belongs to module ``modname``'s documentation.

    True for objects defined in ``modname`` and for objects a public module re-exports from a
    private implementation module of the same package (``temporalio.client`` re-exports
    ``temporalio.client._client.Client``; ``asyncio`` re-exports ``_asyncio.Task``).
    """
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str):
        return False
    if owner == modname:
        return True
    private = any(part.startswith("_") for part in owner.split("."))
    return private and owner.lstrip("_").split(".")[0] == modname.split(".")[0]


def _module_docs(module: ModuleType, seen: set[int]) -> Iterator[tuple[str, str]]:
    """(dotted source, docstring) for a module, its public classes, functions and methods.

    ``seen`` holds the ids of objects already documented, so a re-exported object is documented
    once, under the first public module that exports it.
    """
    modname = module.__name__
    doc = _clean_doc(module)
    if doc:
        yield modname, doc
    try:
        members = sorted(vars(module).items())
    except Exception:
        return
    for name, obj in members:
        if name.startswith("_") or id(obj) in seen or not _documented_here(obj, modname):
            continue
        seen.add(id(obj))
        if inspect.isclass(obj):
            doc = _clean_doc(obj)
            if doc and not _is_autogenerated(obj, doc):
                yield f"{modname}.{name}", doc
            try:
                yield from _member_docs(obj, f"{modname}.{name}")
            except Exception:
                continue
        elif inspect.isroutine(obj):
            doc = _clean_doc(obj)
            if doc:
                yield f"{modname}.{name}", doc


def _split_long(paragraph: str, max_chars: int) -> Iterator[str]:
    """Split one over-long paragraph on line breaks, then on spaces, then hard."""
    current = ""
    for line in paragraph.splitlines():
        while len(line) > max_chars:
            cut = line.rfind(" ", 0, max_chars + 1)
            cut = cut if cut > max_chars // 2 else max_chars
            head, line = line[:cut].rstrip(), line[cut:].lstrip()
            if current:
                yield current
                current = ""
            yield head
        if current and len(current) + 1 + len(line) > max_chars:
            yield current
            current = line
        else:
            current = f"{current}\n{line}" if current else line
    if current:
        yield current


def split_docstring(doc: str, max_chars: int) -> list[str]:
    """Pack a docstring's paragraphs into chunks of at most ``max_chars`` characters."""
    chunks: list[str] = []
    current = ""
    for block in doc.split("\n\n"):
        paragraph = block.strip("\n").rstrip()
        if not paragraph.strip():
            continue
        pieces = [paragraph] if len(paragraph) <= max_chars else _split_long(paragraph, max_chars)
        for piece in pieces:
            if current and len(current) + 2 + len(piece) > max_chars:
                chunks.append(current)
                current = piece
            else:
                current = f"{current}\n\n{piece}" if current else piece
    if current:
        chunks.append(current)
    return [chunk.strip() for chunk in chunks if len(chunk.strip()) >= MIN_PASSAGE_CHARS]


def _fair_shares(sizes: Sequence[int], total: int) -> list[int]:
    """Split ``total`` over groups of ``sizes``: equal shares, what a small group leaves goes to
    the larger ones (max-min fairness)."""
    shares = [0] * len(sizes)
    remaining = total
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    for position, index in enumerate(order):
        share = min(sizes[index], remaining // (len(order) - position))
        shares[index] = share
        remaining -= share
    return shares


def build_docstring_corpus(
    modules: Sequence[str],
    *,
    max_passages: int = 4000,
    max_chars: int = 900,
    exclude: Sequence[str] = (),
) -> list[Passage]:
    """Passages made of the docstrings of ``modules`` and their public submodules.

    Walking a top-level module stops once it alone has ``max_passages`` passages; the modules
    then share ``max_passages`` fairly (a module that needs less than an equal share leaves the
    rest to the others). Submodules under an ``exclude`` prefix and modules that fail to import
    are skipped. The result is deterministic for a given environment and free of duplicate texts.
    """
    seen_texts: set[str] = set()
    seen_objects: set[int] = set()
    groups: list[list[Passage]] = []
    for top in modules:
        group: list[Passage] = []
        for module in _walk_modules(top, exclude):
            if len(group) >= max_passages:
                break
            try:
                docs = list(_module_docs(module, seen_objects))
            except Exception:
                continue
            for source, doc in docs:
                for chunk in split_docstring(doc, max_chars):
                    if chunk not in seen_texts:
                        seen_texts.add(chunk)
                        group.append(Passage(source=source, text=chunk))
        groups.append(group)
    shares = _fair_shares([len(group) for group in groups], max(0, max_passages))
    return [
        passage for group, share in zip(groups, shares, strict=True) for passage in group[:share]
    ]


def ensure_domain_corpus(domain: str, corpus_dir: Path) -> Path:
    """``corpus_dir/<domain>.jsonl``, built from the domain's packages if it does not exist yet.

    Several processes may call this at once: a lock file serialises the builders, so the corpus
    is built once, and the file itself is written atomically. Building imports the domain's
    packages and takes about a second; it blocks, and while it imports it redirects
    ``sys.stdout``/``sys.stderr``, so call it at start-up (or via ``asyncio.to_thread``) rather
    than while other threads print.
    """
    spec = DEV_DOMAINS.get(domain)
    if spec is None:
        known = ", ".join(DEV_DOMAINS)
        raise ValueError(f"unknown corpus domain {domain!r}; known domains: {known}")
    path = Path(corpus_dir) / f"{domain}.jsonl"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.parent / f".{domain}.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if not path.exists():
                save_passages(path, build_docstring_corpus(spec.modules, exclude=spec.exclude))
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return path
