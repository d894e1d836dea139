"""Where text comes from: files, folders, JSONL files, or `stdlib` (Python's own source, present wherever Python is).

Sources are read lazily, one document at a time and a document a piece at a time, so memory stays flat however
large the corpus or any one file of it is.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gptlab.errors import GptlabError

DEFAULT_EXTENSIONS = (".txt", ".md", ".py", ".rst", ".json", ".csv", ".html", ".c", ".h", ".js", ".ts", ".java")
PIECE_CHARS = 1 << 14  # a document is read and encoded in pieces of about this many characters, cut at line ends
READ_BYTES = 1 << 20  # what the UTF-8 check reads at a time


@dataclass
class Document:
    """One document: its size, and its text as pieces read when asked (a large file is never in memory whole)."""

    bytes: int
    chars: int
    read: Callable[[], Iterator[str]]  # the pieces, in order; "".join of them is the document
    where: str = ""  # the file it is, or FILE:LINE for a JSONL record (what a retrieved passage cites)

    def text(self) -> str:
        return "".join(self.read())


def pieces(text: str) -> Iterator[str]:
    """Cut a text at line ends into pieces of about PIECE_CHARS characters (BPE never merges across a cut that falls
    on a newline it would keep whole anyway)."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = text.rfind("\n", start, start + PIECE_CHARS) + 1
        cut = cut if cut > start else start + PIECE_CHARS
        yield text[start:cut]
        start = cut
    yield text[start:]


def file_pieces(path: Path) -> Iterator[str]:
    """A UTF-8 file's `pieces`, read a block at a time: the same cuts as `pieces` of the whole text."""
    with open(path, encoding="utf-8", newline="") as f:
        buffer = ""
        while True:
            block = f.read(PIECE_CHARS)
            buffer += block
            while len(buffer) > PIECE_CHARS:  # enough text to know where the next piece ends
                cut = buffer.rfind("\n", 0, PIECE_CHARS) + 1 or PIECE_CHARS
                yield buffer[:cut]
                buffer = buffer[cut:]
            if not block:
                break
        yield buffer


def utf8_chars(path: Path) -> int:
    """The number of characters of a UTF-8 file, read a block at a time; UnicodeDecodeError (with the byte offset
    of the file in `start`) if it is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    chars = offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            try:
                chars += len(decoder.decode(block, final=not block))
            except UnicodeDecodeError as e:
                raise UnicodeDecodeError("utf-8", e.object, e.start, e.end, f"{e.reason} at byte "
                                         f"{max(0, offset - len(e.object) + len(block)) + e.start}") from None
            if not block:
                return chars
            offset += len(block)


@dataclass
class SourceReport:
    """What reading the sources found; printed at the end of `prepare` and stored in meta.json."""

    documents: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: reason"
    quiet: bool = False  # a second pass over the same sources (the tokenizer's) says nothing again

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append(f"{path}: {reason}")
        if not self.quiet:
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
              report: SourceReport | None = None) -> Iterator[Document]:
    """Each non-empty document; files that are not UTF-8 and JSONL lines without the field are skipped and
    reported."""
    report = report if report is not None else SourceReport()
    for kind, path in files:
        try:
            if kind == "jsonl":
                yield from _jsonl(path, text_field, report)
                continue
            chars = utf8_chars(path)  # a first pass: a file that is not UTF-8 is skipped before any of it is used
            size = os.path.getsize(path)
        except UnicodeDecodeError as e:
            report.skip(str(path), f"not UTF-8 ({e.reason})")
            continue
        except OSError as e:
            report.skip(str(path), e.strerror or str(e))
            continue
        if chars:
            report.documents += 1
            report.bytes += size
            yield Document(size, chars, lambda path=path: file_pieces(path), str(path))


def texts(files: Sequence[tuple[str, Path]], text_field: str = "text") -> Iterator[str]:
    """The documents' text in pieces (what a tokenizer trains on); what is skipped is said by the pass that encodes."""
    for doc in documents(files, text_field, SourceReport(quiet=True)):
        yield from doc.read()


def _jsonl(path: Path, text_field: str, report: SourceReport) -> Iterator[Document]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                report.skip(f"{path}:{n}", f"not UTF-8 (byte {e.start} of the line)")
                continue
            except json.JSONDecodeError:
                report.skip(f"{path}:{n}", "not JSON")
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                report.skip(f"{path}:{n}", f"no string field {text_field!r}")
                continue
            if text:
                report.documents += 1
                size = len(text.encode("utf-8"))
                report.bytes += size
                yield Document(size, len(text), lambda text=text: pieces(text), f"{path}:{n}")


def total_bytes(files: Sequence[tuple[str, Path]]) -> int:
    return sum(os.path.getsize(p) for _, p in files)
