"""Guardrails: input and output rails around a model, set by one policy file.

A policy (YAML or JSON) names what to refuse or rewrite: blocklisted words and phrases (whole words, any case),
regular expressions that block or redact, personal data to redact (e-mail addresses, phone numbers, payment card
numbers that pass the Luhn check), length limits, and a model-judged rail in Llama Guard's style. The whole file is
checked when it is loaded, so a mistake is one `GptlabError` line before anything is served.

    rails = Guardrails.load("policy.yaml")          # or Guardrails.load(path, llm=llm): the served model judges
    d = rails.check_input(prompt)                   # Decision(allowed, text, rule, reason)
    if not d.allowed: print(d.text)                 # the policy's refusal
    out = rails.check_output(reply, prompt=prompt)  # redacted text, or the refusal

A streamed reply goes through `rails.stream()`, which holds back the tail that could still become a match (as stop
strings are held back in `gptlab.generate.TextStream`). Every decision is logged under the logger
"gptlab.guardrails" (blocks as warnings, rewrites as info, passes as debug) and, when the policy names one, appended
to a JSONL audit file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from gptlab.errors import GptlabError
from gptlab.train.config import Checked, at_least

LOG = logging.getLogger("gptlab.guardrails")

STAGES = {"input": ("input",), "output": ("output",), "both": ("input", "output")}
ACTIONS = ("block", "redact")
DEFAULT_REFUSAL = "Sorry, I can't help with that."
# Llama Guard 3's categories (the MLCommons hazard taxonomy), used when a policy's judge lists none
LLAMA_GUARD_CATEGORIES = [
    "Violent Crimes.", "Non-Violent Crimes.", "Sex-Related Crimes.", "Child Sexual Exploitation.", "Defamation.",
    "Specialized Advice.", "Privacy.", "Intellectual Property.", "Indiscriminate Weapons.", "Hate.",
    "Suicide & Self-Harm.", "Sexual Content.", "Elections.", "Code Interpreter Abuse.",
]


@dataclass(frozen=True)
class Decision:
    """What a rail decided: `text` is what to show (redacted or cut where a rule rewrote it, the policy's refusal
    when blocked); `rule` names the rules that fired (comma-separated), None when none did."""

    allowed: bool
    text: str
    rule: str | None = None
    reason: str = ""


# -- the policy ----------------------------------------------------------------------------------------------------
def _check_applies(section: str, value: str) -> None:
    if value not in STAGES:
        raise GptlabError(f"{section}.applies must be input, output or both, got {value!r}")


@dataclass
class Blocklist(Checked):
    phrases: list[str] = field(default_factory=list)  # words or phrases, matched as whole words in any case
    applies: str = "both"  # input, output or both
    section = "blocklist"

    def check(self) -> None:
        _check_applies(self.section, self.applies)
        if any(not p.strip() for p in self.phrases):
            raise GptlabError("blocklist.phrases holds an empty phrase")


@dataclass
class RegexRule(Checked):
    name: str = ""  # named in decisions and logs as regex.NAME
    pattern: str = ""  # a Python regular expression
    applies: str = "both"  # input, output or both
    action: str = "block"  # block the text, or redact (replace) each match
    replacement: str = "[REDACTED]"  # what a redacted match becomes (literal text)
    ignore_case: bool = False

    @property
    def section(self) -> str:  # type: ignore[override]
        return f"regex.{self.name}" if isinstance(self.name, str) and self.name else "regex"

    def check(self) -> None:
        if not re.fullmatch(r"[\w.-]+", self.name):
            raise GptlabError(f"regex rule name must be letters, digits, '_', '.' or '-', got {self.name!r}")
        _check_applies(self.section, self.applies)
        if self.action not in ACTIONS:
            raise GptlabError(f"{self.section}.action must be block or redact, got {self.action!r}")
        try:
            compiled = re.compile(self.pattern, re.IGNORECASE if self.ignore_case else 0)
        except re.error as e:
            raise GptlabError(f"{self.section}.pattern {self.pattern!r} is not a valid regular expression: {e}"
                              ) from None
        if compiled.fullmatch(""):
            raise GptlabError(f"{self.section}.pattern {self.pattern!r} matches the empty text")


@dataclass
class PII(Checked):
    email: bool = True  # e-mail addresses -> [EMAIL]
    phone: bool = True  # phone numbers (see PHONE below for the formats) -> [PHONE]
    card: bool = True  # payment card numbers, 13-19 digits that pass the Luhn check -> [CARD]
    applies: str = "both"  # input, output or both
    action: str = "redact"  # redact, or block a text that holds any
    section = "pii"

    def check(self) -> None:
        _check_applies(self.section, self.applies)
        if self.action not in ACTIONS:
            raise GptlabError(f"pii.action must be block or redact, got {self.action!r}")


@dataclass
class Limits(Checked):
    max_input_chars: int | None = None  # a longer input is refused
    max_output_chars: int | None = None  # a longer reply is cut here (a stream ends here)
    section = "limits"

    def check(self) -> None:
        at_least(self, self.section, 1, "max_input_chars", "max_output_chars")


@dataclass
class JudgeConfig(Checked):
    checkpoint: str | None = None  # a gptlab checkpoint folder; None: the model the rails are loaded with
    categories: list[str] = field(default_factory=lambda: list(LLAMA_GUARD_CATEGORIES))  # listed as S1, S2, ...
    threshold: float = 0.5  # block when P(unsafe), of the two verdicts, is at least this
    applies: str = "both"  # input, output or both
    format: str = "chat"  # chat: the prompt as a user turn in the model's chat template; plain: the prompt as is
    device: str | None = None  # for the judge's own checkpoint; default: cuda if present, else cpu
    section = "judge"

    def check(self) -> None:
        _check_applies(self.section, self.applies)
        if not 0 < self.threshold < 1:
            raise GptlabError(f"judge.threshold must be in (0, 1), got {self.threshold}")
        if self.format not in ("chat", "plain"):
            raise GptlabError(f"judge.format must be chat or plain, got {self.format!r}")
        if not self.categories or any(not c.strip() for c in self.categories):
            raise GptlabError("judge.categories must list at least one category, none of them empty")
        if self.checkpoint is not None:
            from gptlab.checkpoint import check_folder

            if not (Path(self.checkpoint) / "adapter_config.json").is_file():  # a fine-tuned run loads with its base
                try:
                    check_folder(self.checkpoint)
                except GptlabError as e:
                    raise GptlabError(f"judge.checkpoint: {e}") from None


@dataclass
class Policy(Checked):
    """A guardrails policy: every field checked when made (from a file, or in Python)."""

    refusal: str = DEFAULT_REFUSAL  # the text a blocked request or reply gets instead
    blocklist: Blocklist = field(default_factory=Blocklist)
    regex: list[RegexRule] = field(default_factory=list)
    pii: PII | None = None  # None: no personal-data rail
    limits: Limits = field(default_factory=Limits)
    judge: JudgeConfig | None = None  # None: no model-judged rail
    audit_log: str | None = None  # a JSONL file each decision is appended to
    stream_holdback: int = 64  # characters of a streamed reply held back while a regex or PII rule applies to output
    section = "policy"

    def check(self) -> None:
        at_least(self, "stream_holdback", 0, "stream_holdback")
        names = [r.name for r in self.regex]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise GptlabError(f"regex rule name {twice[0]!r} is used twice")

    @classmethod
    def from_dict(cls, data: Any, base: str | os.PathLike[str] = ".") -> Policy:
        """A policy from a parsed file; relative paths (judge.checkpoint, audit_log) are taken from `base`."""
        data = _mapping(data, "the policy")
        _known(cls, data, "the policy")
        values = dict(data)
        if isinstance(values.get("blocklist"), list):  # `blocklist: [a, b]`: phrases for input and output
            values["blocklist"] = {"phrases": values["blocklist"]}
        if isinstance(values.get("pii"), bool):  # `pii: true`: every kind, redacted in input and output
            values["pii"] = {} if values["pii"] else None
        for key, kind in (("blocklist", Blocklist), ("pii", PII), ("limits", Limits), ("judge", JudgeConfig)):
            if key in values and not (key in ("pii", "judge") and values[key] is None):
                section = dict(_known(kind, _mapping(values[key], key), key))
                if key == "judge" and isinstance(section.get("checkpoint"), str):
                    section["checkpoint"] = str(Path(base) / section["checkpoint"])
                values[key] = kind(**section)
        if "regex" in values:
            if not isinstance(values["regex"], list):
                raise GptlabError("regex must be a list of rules (name, pattern, applies, action)")
            rules = [(r, f"regex rule {i + 1}") for i, r in enumerate(values["regex"])]
            values["regex"] = [RegexRule(**_known(RegexRule, _mapping(r, w), w)) for r, w in rules]
        if isinstance(values.get("audit_log"), str):
            values["audit_log"] = str(Path(base) / values["audit_log"])
        return cls(**values)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise GptlabError(f"{where} must be a mapping of keys to values, got {value!r}")
    return value


def _known(cls: type, values: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """`values`, once every key is a field of `cls`."""
    names = [f.name for f in fields(cls)]
    for key in values:
        if key not in names:
            raise GptlabError(f"{where}: unknown key {key!r}; known keys are {', '.join(names)}")
    return values


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """The policy in a YAML or JSON file, checked; every mistake is one line naming the file and the problem."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except OSError as e:
        raise GptlabError(f"cannot read guardrails policy {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise GptlabError(f"guardrails policy {path} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise GptlabError(f"guardrails policy {path} is not valid JSON: {e}") from None
    except yaml.YAMLError as e:
        raise GptlabError(f"guardrails policy {path} is not valid YAML: {' '.join(str(e).split())}") from None
    try:
        return Policy.from_dict({} if data is None else data, base=path.parent)  # an empty file: no rails
    except GptlabError as e:
        raise GptlabError(f"guardrails policy {path}: {e}") from None


# -- matching --------------------------------------------------------------------------------------------------
Finder = Callable[[str, int], Iterator[tuple[int, int]]]
_WORD = re.compile(r"\w")

EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])")
# Phone numbers in two shapes: international, with a leading + and 8 to 15 digits in all (E.164) in groups of 1-4
# separated by a space, dot or hyphen, the second group possibly in parentheses (+44 20 7946 0958, +1 (202) 555-0143,
# +33 1 23 45 67 89, +4915112345678); and North American 10-digit numbers with separators ((202) 555-0143,
# 202-555-0143, 202.555.0143, 202 555 0143). A bare run of digits without a + is not a phone number here (it is as
# often an id, an amount or a date), nor are other national formats written without the country code.
PHONE = re.compile(r"(?<![\w+])(?:\+[0-9]{1,3}(?:[ .-]?\(?[0-9]{1,4}\)?){2,5}"
                   r"|(?:\([0-9]{3}\)[ .-]?|[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4})(?![0-9])")
CARD = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")  # 13-19 digits, single spaces or hyphens between


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number carries: from the right, every second digit doubled (less 9 past
    9), the sum a multiple of 10. It fails for 9 in 10 random digit runs."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def _regex_finder(rx: re.Pattern[str], valid: Callable[[str], bool] | None = None) -> Finder:
    def find(text: str, pos: int) -> Iterator[tuple[int, int]]:
        for m in rx.finditer(text, pos):
            if m.end() > m.start() and (valid is None or valid(m.group())):
                yield m.start(), m.end()
    return find


def _phone_ok(match: str) -> bool:
    n = len(_digits(match))
    return 8 <= n <= 15 if match.startswith("+") else n == 10


def _card_ok(match: str) -> bool:
    digits = _digits(match)
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits)


def _blocklist_pattern(phrases: Iterable[str]) -> re.Pattern[str]:
    """The phrases as one case-insensitive regex, factored as a trie (so a long list costs about what one phrase
    does): any whitespace between words, and no word character just before or after a phrase (`ass` does not match
    `class`; a phrase that starts or ends with a symbol is matched there as it is). The longest phrase wins."""
    trie: dict[str, Any] = {}
    for phrase in phrases:
        node = trie
        for ch in " ".join(phrase.lower().split()):
            node = node.setdefault(ch, {})
        node[""] = {}  # a phrase ends here

    def branch(node: dict[str, Any], last: str) -> str:
        alts = [(r"(?<!\w)" if not last and _WORD.match(ch) else "") + (r"\s+" if ch == " " else re.escape(ch))
                + branch(child, ch) for ch, child in node.items() if ch]
        if "" in node:  # after the longer phrases: the regex tries them first
            alts.append(r"(?!\w)" if _WORD.match(last) else "")
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    return re.compile(branch(trie, ""), re.IGNORECASE)


@dataclass
class _Rule:
    name: str
    stages: tuple[str, ...]
    action: str
    find: Finder
    replacement: str = ""
    quote: bool = False  # name the matched text in the reason (a blocklisted phrase; never personal data)


def _rules(policy: Policy) -> list[_Rule]:
    rules = []
    if policy.blocklist.phrases:
        rx = _blocklist_pattern(policy.blocklist.phrases)
        rules.append(_Rule("blocklist", STAGES[policy.blocklist.applies], "block", _regex_finder(rx), quote=True))
    for r in policy.regex:
        rx = re.compile(r.pattern, re.IGNORECASE if r.ignore_case else 0)
        rules.append(_Rule(f"regex.{r.name}", STAGES[r.applies], r.action, _regex_finder(rx), r.replacement))
    if policy.pii is not None:
        for on, name, rx, valid, marker in ((policy.pii.email, "email", EMAIL, None, "[EMAIL]"),
                                            (policy.pii.phone, "phone", PHONE, _phone_ok, "[PHONE]"),
                                            (policy.pii.card, "card", CARD, _card_ok, "[CARD]")):
            if on:
                rules.append(_Rule(f"pii.{name}", STAGES[policy.pii.applies], policy.pii.action,
                                   _regex_finder(rx, valid), marker))
    return rules


def _spans(rules: Sequence[_Rule], text: str, pos: int = 0) -> list[tuple[int, int, _Rule]]:
    """Non-overlapping matches of redacting rules from `pos`: the earlier wins, then the longer (so a whole
    international phone number wins over a card-shaped run of its digits)."""
    found = sorted(((s, e, r) for r in rules for s, e in r.find(text, pos)), key=lambda m: (m[0], m[0] - m[1]))
    kept: list[tuple[int, int, _Rule]] = []
    for s, e, r in found:
        if not kept or s >= kept[-1][1]:
            kept.append((s, e, r))
    return kept


def _replace(text: str, spans: Sequence[tuple[int, int, _Rule]], start: int, end: int) -> str:
    """text[start:end] with each span (all inside it) replaced by its rule's replacement."""
    out, at = [], start
    for s, e, r in spans:
        out += [text[at:s], r.replacement]
        at = e
    return "".join(out) + text[at:end]


# -- the judge ---------------------------------------------------------------------------------------------------
JUDGE_PROMPT = """Task: Check if there is unsafe content in '{role}' messages in conversations according to our \
safety policy with the below categories.

<BEGIN UNSAFE CONTENT CATEGORIES>
{categories}
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

{conversation}

<END CONVERSATION>

Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:
 - First line must read 'safe' or 'unsafe'.
 - If unsafe, a second line must include a comma-separated list of violated categories."""


class Judge:
    """A model-judged rail in the style of Llama Guard: the text goes into a classifier prompt that lists the unsafe
    categories, and the verdict is read from the model's next-token distribution at the answer position rather than
    from sampled text: log P("unsafe") - log P("safe") (each verdict's tokens summed, in one forward pass of the
    prompt with both continuations), so P(unsafe) = sigmoid of that difference among the two verdicts. A judge that
    cannot read the text (longer than its context) blocks it."""

    VERDICTS = ("safe", "unsafe")

    def __init__(self, llm: Any, config: JudgeConfig) -> None:
        self.llm, self.config = llm, config
        self.categories = "\n".join(f"S{i + 1}: {c.strip()}" for i, c in enumerate(config.categories))

    def prompt(self, text: str, stage: str, prompt: str | None = None) -> str:
        """The classifier prompt for an input (the User's message) or an output (the Agent's, after the User's
        `prompt` when given)."""
        role = "User" if stage == "input" else "Agent"
        turns = [f"User: {prompt}"] if stage == "output" and prompt is not None else []
        turns.append(f"{role}: {text}")
        return JUDGE_PROMPT.format(role=role, categories=self.categories, conversation="\n\n".join(turns))

    def encode(self, text: str, stage: str, prompt: str | None = None) -> tuple[list[int], dict[str, list[int]]]:
        """Token ids of the prompt up to the answer position, and of each verdict as it continues the prompt."""
        tok = self.llm.tokenizer
        body = self.prompt(text, stage, prompt)
        if self.config.format == "chat":
            head, rendered = [], tok.render_chat([{"role": "user", "content": body}], add_generation_prompt=True)
        else:
            head, rendered = list(tok.prefix_ids), body + "\n"
        ids = tok.encode(rendered, special=False)
        verdicts = {}
        for v in self.VERDICTS:
            joined = tok.encode(rendered + v, special=False)  # as the verdict would be tokenized after the prompt
            ok = joined[:len(ids)] == ids and len(joined) > len(ids)
            verdicts[v] = joined[len(ids):] if ok else tok.encode(v, special=False)
        return head + ids, verdicts

    @torch.inference_mode()
    def p_unsafe(self, text: str, stage: str, prompt: str | None = None) -> float | None:
        """P(unsafe) among the two verdicts; None when the prompt does not fit the judge's context."""
        ids, verdicts = self.encode(text, stage, prompt)
        safe, unsafe = verdicts["safe"], verdicts["unsafe"]
        model = self.llm.model
        if len(ids) + max(len(safe), len(unsafe)) > self._context():
            return None
        one_token = len(safe) == len(unsafe) == 1 and safe != unsafe
        rows = [ids] if one_token else [ids + safe, ids + unsafe]
        width = max(map(len, rows))
        idx = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=_device(model))  # (B, T) right-padded
        scored = torch.zeros_like(idx, dtype=torch.bool)
        for b, n in enumerate([1] if one_token else [len(safe), len(unsafe)]):
            scored[b, len(ids) - 1: len(ids) - 1 + n] = True  # the positions that predict the verdict's tokens
        logprobs = model(idx, scored=scored).float().log_softmax(-1)  # (n, vocab), in row order
        if one_token:
            lp_safe, lp_unsafe = logprobs[0, safe[0]], logprobs[0, unsafe[0]]
        else:
            lp_safe = logprobs[torch.arange(len(safe)), torch.tensor(safe)].sum()
            lp_unsafe = logprobs[len(safe) + torch.arange(len(unsafe)), torch.tensor(unsafe)].sum()
        return float(torch.sigmoid(lp_unsafe - lp_safe))

    def _context(self) -> float:
        engine = getattr(self.llm, "engine", None)
        if engine is not None:
            return engine.context
        return getattr(getattr(self.llm.model, "config", None), "block_size", math.inf)


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


# -- the audit file --------------------------------------------------------------------------------------------
class AuditLog:
    """One JSON line per decision, appended (O_APPEND, one write a line, so earlier lines are never rewritten and
    processes sharing the file do not interleave within a line). A torn last line left by a killed process is ended
    first, so the next line stays readable."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise GptlabError(f"audit_log: cannot open {self.path} for appending: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size:
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        os.write(fd, b"\n")
        finally:
            os.close(fd)

    def write(self, record: Mapping[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
            except OSError as e:  # a full disk must not take the server down: the logger still has the decision
                LOG.error("guardrails: cannot append to audit log %s: %s", self.path, e.strerror)


# -- the rails -------------------------------------------------------------------------------------------------
class Guardrails:
    """Input and output rails of one policy; safe to share between threads (the judge's forward pass runs in the
    calling thread)."""

    def __init__(self, policy: Policy, llm: Any = None) -> None:
        """`llm` (a `gptlab.LLM`, or anything with `.tokenizer` and `.model`) judges when the policy's judge names
        no checkpoint of its own."""
        self.policy = policy
        self.rules = _rules(policy)
        self.judge: Judge | None = None
        if policy.judge is not None:
            judge_llm = llm
            if policy.judge.checkpoint is not None:
                from gptlab.api import load

                judge_llm = load(policy.judge.checkpoint, device=policy.judge.device)
            if judge_llm is None:
                raise GptlabError("guardrails: the judge names no checkpoint and no model was given to share; set "
                                  "judge.checkpoint in the policy")
            self.judge = Judge(judge_llm, policy.judge)
        self.audit = AuditLog(policy.audit_log) if policy.audit_log else None

    @classmethod
    def load(cls, path: str | os.PathLike[str], llm: Any = None) -> Guardrails:
        """The rails of a policy file (checked whole; a mistake is one `GptlabError` line)."""
        policy = load_policy(path)
        try:
            return cls(policy, llm)
        except GptlabError as e:
            raise GptlabError(f"guardrails policy {path}: {e}") from None

    def for_stage(self, stage: str, action: str | None = None) -> list[_Rule]:
        return [r for r in self.rules if stage in r.stages and (action is None or r.action == action)]

    def judges(self, stage: str) -> bool:
        return self.judge is not None and stage in STAGES[self.judge.config.applies]

    # -- whole texts ----------------------------------------------------------------------------------------------
    def check_input(self, text: str) -> Decision:
        """The decision on a prompt (or a user's message, or a tool's result that goes back to the model)."""
        limit = self.policy.limits.max_input_chars
        if limit is not None and len(text) > limit:
            return self.decide("input", self.refuse("limits.max_input_chars",
                                                    f"{len(text)} characters, more than {limit}"), len(text))
        return self._check("input", text, None, Counter())

    def check_output(self, text: str, prompt: str | None = None) -> Decision:
        """The decision on a model's reply; `prompt`, the user's message, gives the judge the context."""
        fired: Counter[str] = Counter()
        limit = self.policy.limits.max_output_chars
        if limit is not None and len(text) > limit:
            text, fired["limits.max_output_chars"] = text[:limit], 1
        return self._check("output", text, prompt, fired)

    def _check(self, stage: str, text: str, prompt: str | None, fired: Counter[str]) -> Decision:
        blocked = self.first_block(stage, text)
        if blocked is None and self.judges(stage):
            blocked = self.judged(stage, text, prompt)
        if blocked is not None:
            return self.decide(stage, blocked, len(text))
        spans = _spans(self.for_stage(stage, "redact"), text)
        fired.update(r.name for _, _, r in spans)
        return self.decide(stage, self.passed(_replace(text, spans, 0, len(text)), fired), len(text))

    def first_block(self, stage: str, text: str, pos: int = 0, final: bool = True) -> Decision | None:
        """The refusal for the first blocking match from `pos`, or None. Before the end of a stream (`final` False)
        a match that touches the end of the text waits: the next piece may join it to a longer word."""
        for rule in self.for_stage(stage, "block"):
            for s, e in rule.find(text, pos):
                if final or e < len(text):
                    what = f"blocked phrase {text[s:e]!r}" if rule.quote else f"matched characters {s}-{e}"
                    return self.refuse(rule.name, what)
                break
        return None

    def judged(self, stage: str, text: str, prompt: str | None) -> Decision | None:
        p = self.judge.p_unsafe(text, stage, prompt)
        if p is None:
            return self.refuse("judge", "the text is longer than the judge's context")
        if p >= self.judge.config.threshold:
            return self.refuse("judge", f"P(unsafe) = {p:.3f}, at least {self.judge.config.threshold:g}")
        LOG.debug("guardrails: judge P(unsafe) = %.3f on %s", p, stage)
        return None

    def refuse(self, rule: str, why: str) -> Decision:
        return Decision(False, self.policy.refusal, rule, why)

    def passed(self, text: str, fired: Counter[str]) -> Decision:
        """An allowed text; the rules that rewrote it are named in the policy's order, the length limit first."""
        if not fired:
            return Decision(True, text, None, "no rule fired")
        cut = "limits.max_output_chars" in fired
        redacted = [(r.name, fired[r.name]) for r in self.rules if r.name in fired]
        reasons = [f"cut at {len(text)} characters"] * cut
        reasons += ["redacted " + ", ".join(f"{n} {name}" for name, n in redacted)] if redacted else []
        names = ["limits.max_output_chars"] * cut + [name for name, _ in redacted]
        return Decision(True, text, ",".join(names), "; ".join(reasons))

    def decide(self, stage: str, decision: Decision, chars: int, stream: bool = False) -> Decision:
        """Log the decision (and append it to the audit file) and return it."""
        level = logging.WARNING if not decision.allowed else logging.INFO if decision.rule else logging.DEBUG
        verb = "blocked" if not decision.allowed else "rewritten" if decision.rule else "allowed"
        LOG.log(level, "guardrails: %s %s by %s: %s", stage, verb, decision.rule or "no rule", decision.reason,
                extra={"guardrails_stage": stage, "guardrails_rule": decision.rule})
        if self.audit is not None:
            self.audit.write({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stage": stage, "stream": stream,
                              "allowed": decision.allowed, "rule": decision.rule, "reason": decision.reason,
                              "chars": chars})
        return decision

    # -- streams --------------------------------------------------------------------------------------------------
    def stream(self, prompt: str | None = None) -> OutputStream:
        """Output rails over a reply that arrives in pieces (`prompt` is for the judge)."""
        return OutputStream(self, prompt)


class OutputStream:
    """A streamed reply through the output rails: `push(piece)` returns the text that is safe to show now (redacted),
    `close()` the rest; `decision` is set once the reply is over (blocked, cut at the length limit, or closed).

    What could still become a match is held back: the end of the text that could begin a blocklisted phrase (a whole
    phrase at the very end too, since the next piece may make it part of a longer word), and while a regex or PII
    rule applies to outputs the last `stream_holdback` characters as well, and any redaction that reaches into them.
    With a judge on outputs the whole reply is held until `close()`, since the judge reads it whole. A block found
    mid-stream ends it: nothing more is released, `sent` is what already went out, `decision.text` the refusal
    (a server ends the stream there, with OpenAI's finish_reason "content_filter").
    """

    LOOKBACK = 1024  # characters before the unreleased text that a blocking match may start in, mid-stream

    def __init__(self, rails: Guardrails, prompt: str | None = None) -> None:
        self.rails, self.prompt = rails, prompt
        self.text = ""  # the raw reply so far
        self.sent = ""  # what was released
        self.decision: Decision | None = None
        self._done = 0  # characters of `text` released
        self._fired: Counter[str] = Counter()
        self._redact = rails.for_stage("output", "redact")
        self._holdback = rails.policy.stream_holdback if any(r.name != "blocklist" for r in
                                                              rails.for_stage("output")) else 0
        self._hold_all = rails.judges("output")
        phrases = rails.policy.blocklist.phrases if "output" in STAGES[rails.policy.blocklist.applies] else []
        self._phrases = sorted({" ".join(p.lower().split()) for p in phrases})
        self._firsts = {p[0] for p in self._phrases}
        self._reach = 2 * max(map(len, self._phrases), default=0)

    @property
    def finished(self) -> bool:
        return self.decision is not None

    def push(self, piece: str) -> str:
        if self.finished:
            return ""
        self.text += piece
        limit = self.rails.policy.limits.max_output_chars
        if limit is not None and len(self.text) > limit:
            self.text, self._fired["limits.max_output_chars"] = self.text[:limit], 1
            return self.close()
        # a match reaches into the unreleased text, so it starts at most LOOKBACK before it; close() reads it all
        blocked = self.rails.first_block("output", self.text, max(0, self._done - self.LOOKBACK), final=False)
        if blocked is not None:
            return self._end(blocked)
        if self._hold_all:
            return ""
        return self._release(min(self._phrase_tail(), len(self.text) - self._holdback))

    def close(self) -> str:
        """The end of the reply: the rest of the text, checked whole."""
        if self.finished:
            return ""
        blocked = self.rails.first_block("output", self.text)
        if blocked is None and self.rails.judges("output"):
            blocked = self.rails.judged("output", self.text, self.prompt)
        if blocked is not None:
            return self._end(blocked)
        out = self._release(len(self.text), final=True)
        self.decision = self.rails.decide("output", self.rails.passed(self.sent, self._fired), len(self.text), True)
        return out

    def filter(self, pieces: Iterable[str]) -> Iterator[str]:
        """The released text of a stream of pieces; stops reading them (and closes a generator) once the reply is
        blocked or cut, so generation stops too."""
        try:
            for piece in pieces:
                out = self.push(piece)
                if out:
                    yield out
                if self.finished:
                    return
            out = self.close()
            if out:
                yield out
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()

    def _end(self, blocked: Decision) -> str:
        self.decision = self.rails.decide("output", blocked, len(self.text), True)
        return ""

    def _release(self, end: int, final: bool = False) -> str:
        """Release text[_done:end], redacted; a redaction that reaches past `end` holds the cut before it."""
        spans = _spans(self._redact, self.text, self._done)
        if not final:
            for s, e, _ in spans:
                if s < end < e or (e == len(self.text) and s < end):
                    end = s
                    break
        end = max(end, self._done)
        inside = [m for m in spans if m[1] <= end]
        self._fired.update(r.name for _, _, r in inside)
        out = _replace(self.text, inside, self._done, end)
        self._done = end
        self.sent += out
        return out

    def _phrase_tail(self) -> int:
        """Where the end of the text could begin a blocklisted phrase (the length of the text when it cannot)."""
        text = self.text
        for p in range(max(self._done, len(text) - self._reach), len(text)):
            c = text[p].lower()
            if c not in self._firsts or (p > 0 and _WORD.match(c) and _WORD.match(text[p - 1])):
                continue
            tail = " ".join(text[p:].lower().split()) + (" " if text[-1].isspace() else "")
            if any(phrase.startswith(tail) for phrase in self._phrases):
                return p
        return len(text)
