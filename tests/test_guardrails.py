"""Guardrails: each rail on its own, streams whose pieces split a match, the audit file, the model-judged rail on a
scripted model and on a tiny random checkpoint, and policies that are refused in one line."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import gptlab
from gptlab.checkpoint import save_checkpoint
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.guardrails import (
    PII,
    Blocklist,
    Decision,
    Guardrails,
    JudgeConfig,
    Limits,
    Policy,
    RegexRule,
    load_policy,
    luhn_valid,
)
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer
from tests.conftest import TEXT

VISA = "4111 1111 1111 1111"  # Luhn-valid test numbers
AMEX = "378282246310005"


def rails(**policy) -> Guardrails:
    return Guardrails(Policy(**policy))


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- blocklist, regex, PII, limits ---------------------------------------------------------------------------------
def test_blocklist_matches_whole_words_in_any_case():
    g = rails(blocklist=Blocklist(["bomb", "build a weapon", "c++"]))
    for text in ("a BOMB!", "Bomb", "how to build   a\nWeapon?", "I write C++ daily"):
        d = g.check_input(text)
        assert not d.allowed and d.rule == "blocklist" and d.text == Policy().refusal, text
    for text in ("bombs away", "a bombardier", "abomb", "build a weapons cache", "embassy class"):
        assert g.check_input(text) == Decision(True, text, None, "no rule fired"), text
    assert "'BOMB'" in g.check_input("a BOMB!").reason


def test_blocklist_can_apply_to_one_side_and_the_refusal_is_the_policys():
    g = rails(blocklist=Blocklist(["secret plan"], applies="output"), refusal="No.")
    assert g.check_input("the secret plan").allowed
    assert g.check_output("the secret plan") == Decision(False, "No.", "blocklist", "blocked phrase 'secret plan'")


def test_regex_rules_block_and_redact_where_they_apply():
    g = rails(regex=[RegexRule("ssn", r"\b\d{3}-\d{2}-\d{4}\b", action="block", applies="input"),
                     RegexRule("key", r"sk-[a-z0-9]{8,}", action="redact", replacement="[KEY]", ignore_case=True)])
    d = g.check_input("my ssn is 078-05-1120")
    assert not d.allowed and d.rule == "regex.ssn" and "078" not in d.reason  # no matched text in logs
    assert g.check_output("my ssn is 078-05-1120").allowed  # input only
    d = g.check_output("use SK-ABCDEF123456 or sk-zzzzzzzz9.")
    assert d == Decision(True, "use [KEY] or [KEY].", "regex.key", "redacted 2 regex.key")


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid(AMEX) and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112") and not luhn_valid("79927398710")


def test_pii_redaction_of_emails_phones_and_luhn_valid_cards():
    g = rails(pii=PII())
    d = g.check_output(f"Mail ann.lee+x@mail.example.co.uk, card {VISA} or {AMEX}; call +44 20 7946 0958.")
    assert d.text == "Mail [EMAIL], card [CARD] or [CARD]; call [PHONE]."
    assert d.rule == "pii.email,pii.phone,pii.card" and d.allowed  # in the policy's order
    phones = ["+1 (202) 555-0143", "+1-202-555-0143", "+33 1 23 45 67 89", "+4915112345678", "(202) 555-0143",
              "202-555-0143", "202.555.0143", "202 555 0143"]
    for p in phones:
        assert g.check_output(f"ring {p} now").text == "ring [PHONE] now", p
    kept = ["4111 1111 1111 1112",  # fails the Luhn check
            "1234567890123456",  # a random digit run: fails it too
            "0000 0000 0000 0000",  # passes it, but is no card
            "2025550143", "12345", "+12 34",  # a bare digit run, too few digits for a phone
            "2024-01-15", "v1.2.3", "user@localhost"]
    for text in kept:
        assert g.check_output(f"see {text} here").text == f"see {text} here", text


def test_pii_can_block_instead_and_each_kind_can_be_off():
    assert g_rule(rails(pii=PII(action="block")), "write to a@b.io") == (False, "pii.email")
    assert g_rule(rails(pii=PII(email=False)), "write to a@b.io") == (True, None)
    assert rails(pii=PII(applies="output")).check_input("a@b.io").text == "a@b.io"


def g_rule(g: Guardrails, text: str) -> tuple[bool, str | None]:
    d = g.check_output(text)
    return d.allowed, d.rule


def test_length_limits_refuse_long_inputs_and_cut_long_outputs():
    g = rails(limits=Limits(max_input_chars=10, max_output_chars=5), pii=PII())
    assert g.check_input("x" * 10).allowed
    d = g.check_input("x" * 11)
    assert not d.allowed and d.rule == "limits.max_input_chars" and "11 characters" in d.reason
    assert g.check_output("abcdefgh") == Decision(True, "abcde", "limits.max_output_chars", "cut at 5 characters")


# -- streams -------------------------------------------------------------------------------------------------------
def pieces_of(text: str, rng: random.Random) -> list[str]:
    """`text` split at random, into pieces of 1 to 9 characters."""
    out, at = [], 0
    while at < len(text):
        n = rng.randint(1, 9)
        out.append(text[at:at + n])
        at += n
    return out


class Source:
    """A generator of pieces that records how far it was read and whether it was closed."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces, self.read, self.closed = pieces, 0, False

    def __iter__(self):
        try:
            for p in self.pieces:
                self.read += 1
                yield p
        finally:
            self.closed = True


def test_a_stream_never_shows_a_blocked_phrase_split_across_pieces():
    g = rails(blocklist=Blocklist(["build a bomb"]))
    s = g.stream()
    outs = [s.push(p) for p in ["Sure, here is how to bu", "ild a bo", "mb at home"]]
    assert "".join(outs) == s.sent == "Sure, here is how to "
    assert s.decision == Decision(False, Policy().refusal, "blocklist", "blocked phrase 'build a bomb'")
    assert s.push("more") == "" and s.close() == ""
    source = Source(["how to bu", "ild a bo", "mb", " at", " home"])
    assert "".join(g.stream().filter(iter(source))) == "how to "
    assert source.read == 4 and source.closed  # "bomb" at the end waits for one more piece; then generation stops


def test_a_stream_releases_text_at_once_and_holds_only_what_could_start_a_phrase():
    s = rails(blocklist=Blocklist(["bomb"])).stream()
    assert s.push("hello world") == "hello world"
    assert s.push(" I saw a bo") == " I saw a "  # "bo" may become "bomb"
    assert s.push("mb") == ""  # a whole "bomb" at the end waits: the next piece may extend the word
    assert s.push("ardier.") == "bombardier."
    assert s.close() == "" and s.decision.allowed and s.sent == "hello world I saw a bombardier."


def test_a_stream_redacts_a_match_split_across_pieces():
    g = rails(pii=PII(), regex=[RegexRule("key", r"sk-[a-z0-9]{8,}", action="redact", replacement="[KEY]")])
    s = g.stream()
    text = "".join(s.push(p) for p in ["write to bob@exa", "mple.com or ", "call 202-555-", "0143, key sk-abc",
                                        "def123 thanks"]) + s.close()
    assert text == "write to [EMAIL] or call [PHONE], key [KEY] thanks"
    assert s.decision.rule == "regex.key,pii.email,pii.phone" and s.decision.text == text


def test_a_stream_gives_what_check_output_gives_however_the_pieces_fall():
    g = rails(blocklist=Blocklist(["top secret"]), pii=PII(), limits=Limits(max_output_chars=400),
              regex=[RegexRule("pin", r"PIN \d{4}", action="redact", replacement="PIN ****")], stream_holdback=24)
    ok = (f"Dear ann@example.org, your card {VISA} (not 4111 1111 1111 1112) and PIN 1234 are noted; "
          "we call +1 202 555 0143 tomorrow. Topsecret things stay. ") * 3
    bad = ok[:150] + "this is TOP  secret stuff" + ok[150:]
    rng = random.Random(0)
    for text in (ok, bad):
        want = g.check_output(text)
        for _ in range(20):
            s = g.stream()
            shown = "".join(s.filter(pieces_of(text, rng)))
            assert (s.decision.allowed, s.decision.rule) == (want.allowed, want.rule)
            if want.allowed:
                assert shown == want.text == s.decision.text
            else:
                assert "TOP" not in shown and shown == s.sent and s.decision == want


def test_a_stream_ends_at_the_output_limit():
    g = rails(limits=Limits(max_output_chars=10))
    source = Source(["abcd"] * 10)
    s = g.stream()
    assert "".join(s.filter(iter(source))) == "abcdabcdab"
    assert s.decision.rule == "limits.max_output_chars" and source.read == 3 and source.closed
    s = g.stream()  # a reply of exactly the limit is not cut
    assert "".join(s.filter(["abcde", "fghij"])) == "abcdefghij" and s.decision.rule is None


# -- logging and the audit file ------------------------------------------------------------------------------------
def test_every_decision_is_logged_and_appended_to_the_audit_file(tmp_path, caplog):
    log = tmp_path / "audit.jsonl"
    log.write_text('{"earlier": 1}\n{"torn": ', encoding="utf-8")  # a line a killed process left half-written
    path = write(tmp_path, "blocklist: [bomb]\npii: true\naudit_log: audit.jsonl\n")
    g = Guardrails.load(path)
    with caplog.at_level(logging.DEBUG, logger="gptlab.guardrails"):
        g.check_input("a bomb")
        g.check_output("mail a@b.io")
        g.check_output("fine")
        s = g.stream()
        list(s.filter(["no b", "omb", " here"]))
    lines = log.read_text(encoding="utf-8").splitlines()
    assert lines[:2] == ['{"earlier": 1}', '{"torn": ']
    records = [json.loads(line) for line in lines[2:]]
    assert [(r["stage"], r["allowed"], r["rule"], r["stream"]) for r in records] == [
        ("input", False, "blocklist", False), ("output", True, "pii.email", False), ("output", True, None, False),
        ("output", False, "blocklist", True)]
    assert all(r["reason"] and r["time"] and "a@b.io" not in r["reason"] for r in records)
    got = [(r.name, r.levelname, r.guardrails_rule) for r in caplog.records]
    assert got == [("gptlab.guardrails", "WARNING", "blocklist"), ("gptlab.guardrails", "INFO", "pii.email"),
                   ("gptlab.guardrails", "DEBUG", None), ("gptlab.guardrails", "WARNING", "blocklist")]
    Guardrails.load(path).check_input("again")  # a second process appends after the first one's lines
    assert log.read_text(encoding="utf-8").splitlines()[:6] == lines


# -- the model-judged rail -----------------------------------------------------------------------------------------
class PlannedModel(torch.nn.Module):
    """A bigram "model": after token a, token b gets logit `margin` where the plan says so, every other token 0."""

    def __init__(self, vocab: int, plan: list[int], margin: float) -> None:
        super().__init__()
        table = torch.zeros(vocab, vocab)
        for a, b in zip(plan, plan[1:]):
            table[a, b] = margin
        self.register_buffer("table", table)

    def forward(self, idx: torch.Tensor, scored: torch.Tensor | None = None, **_) -> torch.Tensor:
        logits = self.table[idx]  # (B, T, vocab)
        return logits if scored is None else logits[scored]


def scripted(tokenizer: Tokenizer, verdict: str, margin: float = 8.0, **judge) -> Guardrails:
    """Rails whose judge is a scripted model that, after the judge's prompt, favours `verdict`'s tokens."""
    policy = Policy(judge=JudgeConfig(categories=["Violence.", "Weapons."], **judge))
    probe = Guardrails(policy, SimpleNamespace(tokenizer=tokenizer, model=None))
    ids, verdicts = probe.judge.encode("hello", "input")
    llm = SimpleNamespace(tokenizer=tokenizer, model=PlannedModel(tokenizer.vocab_size, [ids[-1], *verdicts[verdict]],
                                                                  margin))
    return Guardrails(policy, llm)


@pytest.fixture(scope="module")
def verdict_tokenizer() -> Tokenizer:
    """A tokenizer in which "safe" and "unsafe" are one token each, as in Llama Guard's."""
    return Tokenizer.train_bpe([TEXT + "safe\nunsafe\n" * 200], vocab_size=340)


def test_the_judges_prompt_lists_the_categories_and_the_conversation(tokenizer):
    judge = scripted(tokenizer, "safe").judge
    text = judge.prompt("the reply", "output", prompt="the question")
    assert "S1: Violence.\nS2: Weapons." in text and "User: the question\n\nAgent: the reply" in text
    assert "ONLY THE LAST Agent message" in text and "'safe' or 'unsafe'" in text
    assert "User: hi" in judge.prompt("hi", "input") and "Agent" not in judge.prompt("hi", "input")


def test_the_judge_blocks_when_unsafe_wins_on_a_scripted_model(tokenizer, verdict_tokenizer):
    for tok in (tokenizer, verdict_tokenizer):  # verdicts of several tokens each, and of one token each
        d = scripted(tok, "unsafe").check_input("hello")
        assert not d.allowed and d.rule == "judge" and d.text == Policy().refusal
        assert scripted(tok, "safe").check_input("hello") == Decision(True, "hello", None, "no rule fired")
    one = scripted(verdict_tokenizer, "unsafe", margin=2.0)
    assert len(one.judge.encode("hello", "input")[1]["unsafe"]) == 1
    assert one.judge.p_unsafe("hello", "input") == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    assert scripted(verdict_tokenizer, "unsafe", margin=2.0, threshold=0.9).check_input("hello").allowed
    assert scripted(tokenizer, "unsafe", applies="output").check_input("hello").allowed


def test_a_judged_stream_is_held_until_the_judge_has_read_it_whole(tokenizer):
    s = scripted(tokenizer, "safe").stream()
    assert [s.push(p) for p in ("all ", "fine")] == ["", ""] and s.close() == "all fine" and s.decision.allowed


@pytest.fixture(scope="module")
def judge_checkpoint(tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=1024, vocab_size=tokenizer.vocab_size)
    return save_checkpoint(tmp_path_factory.mktemp("guard") / "judge", GPT(cfg), tokenizer)


def test_the_judge_runs_on_a_tiny_gptlab_checkpoint(judge_checkpoint):
    policy = f"judge:\n  checkpoint: {judge_checkpoint.name}\n  categories: [Violence.]\n  device: cpu\n"
    g = Guardrails.load(write(judge_checkpoint.parent, policy))  # a relative path is read from the policy's folder
    p = g.judge.p_unsafe("How do I bake bread?", "input")
    ids, verdicts = g.judge.encode("How do I bake bread?", "input")
    with torch.no_grad():  # the same number the long way: each verdict's row in full, its tokens' log-probs summed
        lp = {}
        for v, cont in verdicts.items():
            logits = g.judge.llm.model(torch.tensor([ids + cont]))[0].float().log_softmax(-1)
            lp[v] = sum(logits[len(ids) - 1 + i, t] for i, t in enumerate(cont))
    assert 0 < p < 1 and p == pytest.approx(torch.sigmoid(lp["unsafe"] - lp["safe"]).item(), abs=1e-5)
    assert g.check_input("How do I bake bread?").allowed == (p < 0.5)
    d = g.check_input("x " * 1500)  # the judge cannot read it all: blocked
    assert not d.allowed and d.rule == "judge" and "context" in d.reason
    shared = Guardrails(dataclasses.replace(g.policy, judge=JudgeConfig(categories=["Violence."])),
                        llm=gptlab.load(judge_checkpoint, device="cpu"))  # the served model judges
    assert shared.judge.p_unsafe("How do I bake bread?", "input") == pytest.approx(p, abs=1e-5)


# -- policies ------------------------------------------------------------------------------------------------------
EXAMPLE = """\
refusal: "Sorry, I can't help with that request."
blocklist:
  phrases: [build a bomb, credit card dump]
  applies: both
regex:
  - {name: api_key, pattern: 'sk-[A-Za-z0-9]{20,}', applies: output, action: redact, replacement: "[KEY]"}
  - {name: ssn, pattern: '\\b\\d{3}-\\d{2}-\\d{4}\\b', action: block}
pii: {email: true, phone: true, card: true, applies: both, action: redact}
limits: {max_input_chars: 4000, max_output_chars: 8000}
audit_log: guardrails.jsonl
stream_holdback: 64
"""


def test_an_example_policy_loads_from_yaml_and_json(tmp_path):
    policy = load_policy(write(tmp_path, EXAMPLE))
    assert policy.blocklist.phrases == ["build a bomb", "credit card dump"]
    assert [r.name for r in policy.regex] == ["api_key", "ssn"] and policy.limits.max_output_chars == 8000
    assert policy.audit_log == str(tmp_path / "guardrails.jsonl") and policy.pii == PII()
    import yaml

    data = yaml.safe_load(EXAMPLE)
    assert load_policy(write(tmp_path, json.dumps(data), name="p.json")) == policy
    assert load_policy(write(tmp_path, "")) == Policy()


@pytest.mark.parametrize("text, problem", [
    ("blocklist: [a\n", "is not valid YAML"),
    ("- a\n- b\n", "the policy must be a mapping"),
    ("blocklst: [a]\n", "unknown key 'blocklst'; known keys are refusal, blocklist"),
    ("pii: {emails: true}\n", "pii: unknown key 'emails'"),
    ("regex: [{name: r, pattern: 'a(b', action: block}]\n", "regex.r.pattern 'a(b' is not a valid regular expression"),
    ("regex: [{name: r, pattern: 'a', action: drop}]\n", "regex.r.action must be block or redact, got 'drop'"),
    ("regex: [{name: r, pattern: 'a', applies: inputs}]\n", "regex.r.applies must be input, output or both"),
    ("regex: [{name: r, pattern: 'a*'}]\n", "regex.r.pattern 'a*' matches the empty text"),
    ("regex: [{pattern: 'a'}]\n", "regex rule name must be"),
    ("regex: [{name: r, pattern: a}, {name: r, pattern: b}]\n", "regex rule name 'r' is used twice"),
    ("regex: {name: r}\n", "regex must be a list of rules"),
    ("regex: [{name: r, pattern: a, flavour: x}]\n", "regex rule 1: unknown key 'flavour'"),
    ("pii: {action: mask}\n", "pii.action must be block or redact, got 'mask'"),
    ("limits: {max_input_chars: ten}\n", "limits.max_input_chars must be integer or null, got 'ten'"),
    ("limits: {max_output_chars: 0}\n", "limits.max_output_chars must be >= 1, got 0"),
    ("blocklist: ['  ']\n", "blocklist.phrases holds an empty phrase"),
    ("judge: {checkpoint: nowhere}\n", "judge.checkpoint: checkpoint folder"),
    ("judge: {threshold: 1.5}\n", "judge.threshold must be in (0, 1), got 1.5"),
    ("judge: {format: xml}\n", "judge.format must be chat or plain"),
    ("judge: {}\n", "the judge names no checkpoint and no model was given"),
    ("refusal: 3\n", "policy.refusal must be text, got 3"),
])
def test_a_bad_policy_is_one_line_naming_the_problem(tmp_path, text, problem):
    path = write(tmp_path, text)
    with pytest.raises(GptlabError) as e:
        Guardrails.load(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"guardrails policy {path}") and problem in message, message


def test_a_bad_json_or_missing_policy_is_one_line(tmp_path):
    for path, problem in ((write(tmp_path, "{bad", name="p.json"), "is not valid JSON"),
                          (tmp_path / "none.yaml", "cannot read guardrails policy")):
        with pytest.raises(GptlabError, match=problem) as e:
            Guardrails.load(path)
        assert "\n" not in str(e.value)
