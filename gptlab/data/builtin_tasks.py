"""Task data that exists on the machine, for demos and for trying methods without downloading anything.

- `stdlib-summaries`: `def name(args): <summarize> first docstring line` for the standard library's documented
  functions (their signatures and the first line of their docstrings).
- `gettext-fr`: `English <to-fr> French` message pairs from the system's gettext catalogues
  (`/usr/share/locale/fr/LC_MESSAGES/*.mo` on Debian-family systems), where they exist.
- `arithmetic`: one- and two-step word problems with their worked reasoning (question, answer, rationale), made
  by rule from a fixed seed: what prompting strategies (chain of thought, self-consistency) are tried on.
"""

from __future__ import annotations

import ast
import gettext
import random
from pathlib import Path

from gptlab.data.sources import stdlib_files
from gptlab.data.tasks import Example
from gptlab.errors import GptlabError

LOCALE_FR = Path("/usr/share/locale/fr/LC_MESSAGES")
BUILTIN = {"stdlib-summaries": "<summarize>", "gettext-fr": "<to-fr>", "arithmetic": None}  # name -> task token


def stdlib_summaries(limit: int | None = None) -> list[Example]:
    examples = []
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
                if first:
                    signature = f"def {node.name}({ast.unparse(node.args)}):"
                    examples.append(Example(f"{signature} <summarize>", f" {first}"))
        if limit and len(examples) >= limit:
            return examples[:limit]
    return examples


def gettext_pairs(folder: Path = LOCALE_FR, limit: int | None = None) -> list[Example]:
    files = sorted(folder.glob("*.mo")) if folder.is_dir() else []
    if not files:
        raise GptlabError(f"no gettext catalogues in {folder}: the <to-fr> demo data needs French translations "
                          "installed (Debian: the packages' own locale files)")
    examples, seen = [], set()
    for mo in files:
        try:
            with open(mo, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog
        except (OSError, UnicodeDecodeError, LookupError, ValueError):
            continue
        for english, french in catalog.items():
            if isinstance(english, str) and "\x04" in english:  # "context\x04message": keep the message
                english = english.split("\x04", 1)[1]
            if isinstance(english, str) and english and isinstance(french, str) and french and "\n" not in english \
                    and "\n" not in french and english not in seen:
                seen.add(english)
                examples.append(Example(f"{english} <to-fr>", f" {french}"))
        if limit and len(examples) >= limit:
            return examples[:limit]
    return examples


def arithmetic(limit: int | None = None) -> list[Example]:
    """Word problems of one or two steps with their reasoning, the same on every machine."""
    rng = random.Random(0)
    names, things = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah"], ["apples", "books", "coins", "stamps", "shells"]
    examples = []
    for _ in range(limit or 200):
        who, what = rng.choice(names), rng.choice(things)
        a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 5)
        kind = rng.randrange(3)
        if kind == 0:
            q = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?"
            why, answer = f"{who} starts with {a} {what} and gets {b} more, so {a} + {b} = {a + b}.", a + b
        elif kind == 1:
            q = f"{who} has {a + b} {what} and gives away {b}. How many {what} are left?"
            why, answer = f"{who} starts with {a + b} {what} and gives away {b}, so {a + b} - {b} = {a}.", a
        else:
            q = f"{who} buys {c} bags of {a} {what} and then finds {b} more. How many {what} does {who} have?"
            why = f"{c} bags of {a} {what} are {c} * {a} = {c * a}; with {b} more, {c * a} + {b} = {c * a + b}."
            answer = c * a + b
        examples.append(Example(q, f" {answer}", rationale=why))  # a leading space, as a completion reads
    return examples


def builtin_examples(name: str, limit: int | None = None) -> list[Example]:
    if name == "arithmetic":
        return arithmetic(limit)
    if name == "stdlib-summaries":
        return stdlib_summaries(limit)
    if name == "gettext-fr":
        return gettext_pairs(limit=limit)
    raise GptlabError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(BUILTIN)}")
