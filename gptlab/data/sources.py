"""Where text comes from: files, folders, JSONL files, or `stdlib` (Python's own source, present wherever Python is).

Sources are read lazily, one document at a time, so memory stays flat however large the corpus is.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gptlab.errors import GptlabError

DEFAULT_EXTENSIONS = (".txt", ".md", ".py", ".rst", ".json", ".csv", ".html", ".c", ".h", ".js", ".ts", ".java")


@dataclass
class SourceReport:
    """What reading the sources found; printed at the end of `prepare` and stored in meta.json."""

    documents: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: reason"

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append(f"{path}: {reason}")
        print(f"gptlab: skipping {path}: {reason}", file=sys.stderr)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's .py files, without its test suites and third-party site-packages."""
    root = stdlib_root()
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}
    return [p for p in sorted(root.rglob("*.py")) if not skip.intersection(p.relative_to(root).parts)]


def resolve(sources: Sequence[str], extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> list[tuple[str, Path]]:
    """(kind, path) for every file the sources name: kind is "text" or "jsonl"."""
    if not sources:
        raise GptlabError("no source given: name files, folders, JSONL files, or stdlib")
    files: list[tuple[str, Path]] = []
    for src in sources:
        if src == "stdlib":
            files += [("text", p) for p in stdlib_files()]
            continue
        path = Path(src)
        if not path.exists():
            raise GptlabError(f"source {src} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
            if not found:
                raise GptlabError(f"folder {src} has no files ending in {', '.join(extensions)}")
            files += [("text", p) for p in found]
        elif path.suffix.lower() == ".jsonl":
            files.append(("jsonl", path))
        else:
            files.append(("text", path))
    return files


def documents(files: Sequence[tuple[str, Path]], text_field: str = "text",
              report: SourceReport | None = None) -> Iterator[str]:
    """Each document's text; files that are not UTF-8 and JSONL lines without the field are skipped and reported."""
    report = report if report is not None else SourceReport()
    for kind, path in files:
        try:
            if kind == "jsonl":
                yield from _jsonl(path, text_field, report)
                continue
            raw = path.read_bytes()
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            report.skip(str(path), f"not UTF-8 (byte {e.start})")
            continue
        except OSError as e:
            report.skip(str(path), e.strerror or str(e))
            continue
        if text:
            report.documents += 1
            report.bytes += len(raw)
            yield text


def _jsonl(path: Path, text_field: str, report: SourceReport) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                report.skip(f"{path}:{n}", "not JSON")
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                report.skip(f"{path}:{n}", f"no string field {text_field!r}")
                continue
            if text:
                report.documents += 1
                report.bytes += len(text.encode("utf-8"))
                yield text


def total_bytes(files: Sequence[tuple[str, Path]]) -> int:
    return sum(os.path.getsize(p) for _, p in files)
