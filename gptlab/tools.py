"""Tools an agent may call: a calculator, a search over a retrieval index, and (only when asked for) Python.

Each tool has a name, a description, a JSON schema of its arguments (what the server's constrained decoding holds a
call to) and a function from those arguments to the text the model reads back. A tool that fails returns the error
as its text: the model reads it and may try again; the agent never stops on it.

The Python tool runs the code in a new interpreter (`python -I`) in an empty temporary folder, with a time limit, a
memory limit (RLIMIT_AS) and an audit hook that refuses sockets, new processes, `ctypes` and file writes outside that
folder. It can still read any file the user can read and use the CPU until its time limit: turn it on only for
code you would run yourself.
"""

from __future__ import annotations

import ast
import math
import operator
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gptlab.errors import GptlabError


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # the JSON schema of its arguments
    run: Callable[[Mapping[str, Any]], str]
    argument: str = "input"  # the argument a ReAct action's bracketed text fills

    def spec(self) -> dict[str, Any]:
        """The tool as OpenAI's `tools` list takes it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def __call__(self, arguments: Mapping[str, Any] | str) -> str:
        """The tool's answer, or the error it met, as text (arguments that do not fit its schema included: a model
        calling through a server that does not constrain its calls may send any)."""
        if isinstance(arguments, str):
            arguments = {self.argument: arguments}
        wrong = schema_mismatch(arguments, self.parameters)
        if wrong:
            return f"error: the arguments do not fit {self.name}'s schema: {wrong}"
        try:
            return str(self.run(arguments))
        except Exception as e:  # the model reads what went wrong
            return f"error: {type(e).__name__}: {e}"


TYPES = {"string": str, "integer": int, "number": int | float, "boolean": bool, "object": dict, "array": list}


def schema_mismatch(arguments: Any, schema: Mapping[str, Any]) -> str | None:
    """Why `arguments` do not fit an object schema of the tools' kind (required names, no others where closed,
    each of its JSON type), or None where they fit."""
    if not isinstance(arguments, Mapping):
        return "they are not a JSON object"
    props = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in arguments]
    if missing:
        return f"{missing[0]!r} is missing"
    extra = [k for k in arguments if k not in props]
    if extra and schema.get("additionalProperties", True) is False:
        return f"{extra[0]!r} is not one of its arguments"
    for name, value in arguments.items():
        kind = props.get(name, {}).get("type")
        if kind in TYPES and (not isinstance(value, TYPES[kind]) or kind in ("integer", "number") and
                              isinstance(value, bool)):
            return f"{name!r} should be of type {kind}"
    return None


def _one_string(name: str, what: str) -> dict[str, Any]:
    return {"type": "object", "properties": {name: {"type": "string", "description": what}}, "required": [name],
            "additionalProperties": False}


# -- calculator ---------------------------------------------------------------------------------------------------
_OPS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
    ast.UAdd: operator.pos}
_FUNCS = {name: getattr(math, name) for name in ("sqrt", "log", "log10", "exp", "sin", "cos", "tan", "floor",
                                                  "ceil", "factorial")} | {"abs": abs, "round": round}
_CONSTS = {"pi": math.pi, "e": math.e}


def calculate(expression: str) -> float | int:
    """An arithmetic expression's value, read as a syntax tree (never `eval`): numbers, + - * / // % **, brackets
    and a few math functions; powers are bounded so that no expression can take the machine."""
    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name) and node.id in _CONSTS:
            return _CONSTS[node.id]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 100 or abs(left) > 1e6):
                raise ValueError("that power is too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and \
                not node.keywords:
            args = [value(a) for a in node.args]
            if node.func.id == "factorial" and args and args[0] > 1000:
                raise ValueError("that factorial is too large")
            return _FUNCS[node.func.id](*args)
        raise ValueError(f"not arithmetic: {ast.unparse(node)}")

    try:
        tree = ast.parse(expression.strip().replace("^", "**"), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    result = value(tree.body)
    return int(result) if isinstance(result, float) and result.is_integer() and abs(result) < 2**53 else result


def calculator() -> Tool:
    return Tool("calculator", "Evaluate an arithmetic expression, e.g. (3 + 4) * 2 or sqrt(2).",
                _one_string("input", "the expression"), lambda a: str(calculate(str(a["input"]))))


# -- search -------------------------------------------------------------------------------------------------------
def search(index: Any, k: int = 3, mode: str | None = None) -> Tool:
    """Passages from a retrieval index (`gptlab.rag`), numbered, with their sources."""
    def run(arguments: Mapping[str, Any]) -> str:
        hits = index.search(str(arguments["input"]), k=k, mode=mode)
        if not hits:
            return "no passage matches"
        return "\n".join(f"[{i}] ({h.where}) {' '.join(h.passage.split())[:500]}" for i, h in enumerate(hits, 1))

    return Tool("search", "Search the document index for passages about a topic.",
                _one_string("input", "what to search for"), run)


# -- python -------------------------------------------------------------------------------------------------------
_SANDBOX = r"""
import os, resource, sys
limit = int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
home = os.path.realpath(os.getcwd())
DENIED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
          "pty.", "ctypes.", "os.kill", "os.killpg", "shutil.rmtree", "os.remove", "os.rmdir", "os.rename")
def audit(event, args):
    if event.startswith(DENIED):
        raise PermissionError(f"{event} is not allowed in this sandbox")
    if event == "open" and len(args) > 2:
        path, mode, flags = args[0], args[1] or "", args[2] or 0
        writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writes and isinstance(path, (str, bytes)) and \
                not os.path.realpath(os.fsdecode(path)).startswith(home + os.sep):
            raise PermissionError("files may be written only in the sandbox's own folder")
code = sys.stdin.read()
sys.addaudithook(audit)
exec(compile(code, "<tool>", "exec"), {"__name__": "__main__"})
"""


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 256, max_chars: int = 2000) -> str:
    """What `code` prints (and the last line of its error, if it fails), run in the sandbox described above."""
    with tempfile.TemporaryDirectory(prefix="gptlab-python-") as home:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "PYTHONIOENCODING": "utf-8"}
        try:
            done = subprocess.run([sys.executable, "-I", "-c", _SANDBOX, str(memory_mb)], input=code, text=True,
                                  capture_output=True, timeout=timeout, cwd=home, env=env)
        except subprocess.TimeoutExpired:
            return f"error: the code ran past its time limit of {timeout:g} s"
    out = done.stdout
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        out += f"error: {lines[-1] if lines else f'exit status {done.returncode}'}"
    return (out[:max_chars] + "\n[output cut]") if len(out) > max_chars else out or "(no output)"


def python(timeout: float = 5.0, memory_mb: int = 256) -> Tool:
    return Tool("python", "Run Python code and read what it prints (no network, no new processes).",
                _one_string("input", "the code"), lambda a: run_python(str(a["input"]), timeout, memory_mb))


def make_tools(names: Sequence[str], index: Any = None, timeout: float = 5.0, memory_mb: int = 256) -> list[Tool]:
    """The tools named: `calculator`, `search` (needs an index) and `python` (only when named)."""
    tools = []
    for name in names:
        if name == "calculator":
            tools.append(calculator())
        elif name == "search":
            if index is None:
                raise GptlabError("the search tool needs an index (--index INDEX, built with gptlab index)")
            tools.append(search(index))
        elif name == "python":
            tools.append(python(timeout, memory_mb))
        else:
            raise GptlabError(f"unknown tool {name!r}; tools: calculator, search, python")
    if len({t.name for t in tools}) < len(tools):
        raise GptlabError("a tool is named twice")
    return tools
