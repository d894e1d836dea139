"""Documents cut into passages: what retrieval finds and a prompt cites.

Passages are measured in characters, not tokens: one index serves BM25 (which has no tokenizer) and whichever dense
encoder it was built with, and its passages stay the same whatever model later reads them. A passage ends at a
paragraph break (a blank line) where one falls in its second half, else at a line end; only a line longer than a
passage is cut inside, at a space where it has one. Consecutive passages share up to `overlap` characters of whole
lines, so a sentence on the cut is whole in one of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from gptlab.errors import GptlabError


@dataclass(frozen=True)
class Passage:
    """One passage: its text, where it comes from, and its place in the index."""

    text: str
    source: str  # the file, or FILE:LINE for a JSONL record
    lines: tuple[int, int]  # its first and last line in the document (1-based)
    doc: int  # which document of the index it is from

    def to_json(self) -> dict:
        return {"text": self.text, "source": self.source, "lines": list(self.lines), "doc": self.doc}

    @classmethod
    def from_json(cls, record: dict) -> Passage:
        return cls(record["text"], record["source"], tuple(record["lines"]), record["doc"])  # type: ignore[arg-type]


def check_settings(passage_chars: int, overlap: int) -> None:
    if passage_chars < 1:
        raise GptlabError(f"--passage-chars must be at least 1, got {passage_chars}")
    if not 0 <= overlap <= passage_chars // 2:
        raise GptlabError(f"--overlap must be in [0, {passage_chars // 2}] (half of --passage-chars), got {overlap}")


def lines(pieces: Iterable[str]) -> Iterator[str]:
    """The lines of a text given in pieces, each with its newline (the last one may have none)."""
    rest = ""
    for piece in pieces:
        buf, start = rest + piece, 0
        while (end := buf.find("\n", start)) != -1:
            yield buf[start:end + 1]
            start = end + 1
        rest = buf[start:]
    if rest:
        yield rest


def cut_long(line: str, size: int) -> Iterator[str]:
    """A line in parts of at most `size` characters, each ended after a space where the part has one."""
    while len(line) > size:
        cut = line.rfind(" ", 0, size) + 1 or size
        yield line[:cut]
        line = line[cut:]
    if line:
        yield line


def split(pieces: Iterable[str], passage_chars: int = 800, overlap: int = 100) -> Iterator[tuple[str, int, int]]:
    """(text, first line, last line) of each passage of a document given as pieces."""
    check_settings(passage_chars, overlap)
    window: list[tuple[int, str, bool]] = []  # (line number, text, not yet in an emitted passage)

    def emit(part: list[tuple[int, str, bool]]) -> tuple[str, int, int] | None:
        """The passage of these lines, without its blank lines at either end (a first line keeps its indent)."""
        full = [(n, t) for n, t, _ in part if t.strip()]
        if not full:
            return None
        start = next(i for i, (_, t, _) in enumerate(part) if t.strip())
        return "".join(t for _, t, _ in part[start:]).rstrip(), full[0][0], full[-1][0]

    def cut_at() -> int:
        """Where the full window ends its passage: after its last blank line past the middle, else at its end."""
        size, best = 0, len(window)
        for i, (_, text, _) in enumerate(window[:-1]):
            size += len(text)
            if not text.strip() and size > passage_chars / 2:
                best = i + 1
        return best

    size = 0
    for number, line in enumerate(lines(pieces), 1):
        for part in cut_long(line, passage_chars):
            while window and size + len(part) > passage_chars:
                cut = cut_at()
                done, keep = window[:cut], window[cut:]
                if (passage := emit(done)) is not None:
                    yield passage
                room = min(overlap, passage_chars - len(part) - sum(len(t) for _, t, _ in keep))
                carry: list[tuple[int, str, bool]] = []
                for n, t, _ in reversed(done):  # the last whole lines of the passage, within the overlap
                    if len(t) > room:
                        break
                    carry.insert(0, (n, t, False))
                    room -= len(t)
                window = carry + keep
                size = sum(len(t) for _, t, _ in window)
            window.append((number, part, True))
            size += len(part)
    if any(fresh for _, _, fresh in window) and (passage := emit(window)) is not None:
        yield passage
