"""The `gptlab` command: one verb per stage.

Every verb takes `--config FILE.yaml` whose keys are the verb's own option names (flags on the command line win).
A user error prints one line on stderr and exits with status 2; it never prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from gptlab.data.sources import DEFAULT_EXTENSIONS
from gptlab.errors import GptlabError
from gptlab.interop.gguf import DTYPES, check_dtype
from gptlab.quant.formats import SCHEMES
from gptlab.train.config import add_section_flags


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (with where to look) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise GptlabError(f"{message} (see {self.prog} --help)")


def _gguf_dtype(text: str) -> str:
    """An argparse type: a weight type GGUF export writes; anything else (a K-quant with why) is one line."""
    try:
        return check_dtype(text)
    except GptlabError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _bounded(kind: type, low: float, high: float | None = None, above: bool = False) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` in [low, high] (`above`: (low, high]); anything else is argparse's
    one-line error."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        top = high if high is not None else float("inf")
        if not (low < value if above else low <= value) or not value <= top:  # nan fails too
            raise argparse.ArgumentTypeError(f"{text} is not in {'(' if above else '['}{low:g}, {top:g}]")
        return value

    parse.__name__ = kind.__name__  # what argparse names in its message
    return parse


POSITIVE = _bounded(int, 1)
COUNT = _bounded(int, 0)
FRACTION = _bounded(float, 0, 0.999999)  # [0, 1)
PORT = _bounded(int, 1, 65535)


def _load_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise GptlabError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise GptlabError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise GptlabError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise GptlabError(f"{path} must hold a mapping of option names to values")
    return data


def _apply_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse once to find --config, take its values as defaults, then parse again so that flags win (a required
    option may come from the file)."""
    config = None
    if "--config" in argv or any(a.startswith("--config=") for a in argv):
        required = [a for a in parser._actions if a.required and a.option_strings]
        for a in required:
            a.required = False
        config = parser.parse_args(argv).config
        for a in required:
            a.required = True
    args = parser.parse_args(argv) if not config else argparse.Namespace(config=config)
    args.config_sections = {}
    if getattr(args, "config", None):
        known = {a.dest for a in parser._actions}
        values = {k.replace("-", "_"): v for k, v in _load_config(args.config).items()}
        sections = {d.split(".", 1)[0] for d in known if "." in d}  # model/train/lora: merged by the train config
        args.config_sections = {k: values.pop(k) for k in sections if k in values}
        unknown = sorted(set(values) - known)
        if unknown:
            raise GptlabError(f"{args.config}: unknown option(s) {', '.join(unknown)} for {parser.prog}")
        for action in parser._actions:  # a file's values pass the checks a flag's do
            if action.dest in values and values[action.dest] is not None:
                values[action.dest] = _checked_value(action, values[action.dest], args.config)
                action.required = False
        parser.set_defaults(**values)
        sections = args.config_sections
        args = parser.parse_args(argv)
        args.config_sections = sections
    return args


def _checked_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A file's value as the flag would give it: a switch takes true or false, a repeatable option a list of texts,
    any other a text or number (read as the flag's text would be)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise GptlabError(f"{where}: {action.dest} must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        return [_checked_item(action, v, where) for v in (value if isinstance(value, list) else [value])]
    return _checked_item(action, value, where)


def _checked_item(action: argparse.Action, value: Any, where: str) -> Any:
    """One value, through the flag's own type and choices."""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise GptlabError(f"{where}: {action.dest} must be a {'number' if callable(action.type) else 'text'}, got "
                          f"{value!r}")
    try:
        value = action.type(str(value)) if callable(action.type) else str(value)
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise GptlabError(f"{where}: {action.dest}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise GptlabError(f"{where}: {action.dest} must be one of {', '.join(map(str, action.choices))}, "
                          f"got {value!r}")
    return value


def _check_text(flag: str, text: str | None) -> None:
    """Bytes that are not UTF-8 reach Python as lone surrogates, which no tokenizer takes."""
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError as e:
        raise GptlabError(f"{flag} is not UTF-8 text (at character {e.start})") from None


def _rails(args: argparse.Namespace, llm: Any = None) -> Any:
    """The guardrails of `--guardrails POLICY` (None without it); the model the command uses judges, unless the
    policy names its own judge."""
    if not getattr(args, "guardrails", None):
        return None
    from gptlab.guardrails import Guardrails

    return Guardrails.load(args.guardrails, llm=llm)


def _guarded_input(rails: Any, text: str) -> str | None:
    """The text after the input rails (perhaps redacted); None, with the refusal printed, when they block it."""
    if rails is None:
        return text
    decision = rails.check_input(text)
    if not decision.allowed:
        print(decision.text)
        return None
    return decision.text


# -- verbs -------------------------------------------------------------------------------------------------------
def cmd_presets(args: argparse.Namespace) -> int:
    from gptlab.presets import preset_rows, render_table

    rows = preset_rows(args.names or None)
    print(json.dumps(rows, indent=2) if args.json else render_table(rows, sizes=args.sizes))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from gptlab.api import load

    for flag, text in (("--prompt", args.prompt), ("--system", args.system), *(("--stop", s) for s in args.stop or ())):
        _check_text(flag, text)
    llm = load(args.checkpoint, device=args.device, dtype=args.dtype)
    rails = _rails(args, llm)
    prompt = _guarded_input(rails, args.prompt)
    if prompt is None:
        return 0
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, repetition_penalty=args.repetition_penalty, stop=args.stop or ())

    def show(pieces: Iterator[str]) -> None:  # streamed through the output rails, which may end it early
        stream = rails.stream(prompt) if rails is not None else None
        for piece in stream.filter(pieces) if stream is not None else pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        if stream is not None and not stream.decision.allowed:
            sys.stdout.write(("\n" if stream.sent else "") + stream.decision.text)
        sys.stdout.write("\n")

    def guarded(text: str) -> str:
        return rails.check_output(text, prompt=prompt).text if rails is not None else text

    if args.chat or args.system:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        if args.stream and not args.json:
            show(llm.chat(messages, stream=True, **kwargs))
            return 0
        reply = guarded(llm.chat(messages, **kwargs))
        print(json.dumps({"text": reply}, ensure_ascii=False) if args.json else reply)
        return 0
    if args.stream and not args.json:
        sys.stdout.write(prompt)
        show(llm.stream(prompt, **kwargs))
        return 0
    (done,) = llm.complete(prompt, **kwargs)
    if rails is not None:
        done.text = guarded(done.text)
    if args.json:
        print(json.dumps({"text": done.text, "token_ids": done.token_ids, "finish_reason": done.finish_reason},
                         ensure_ascii=False))
    else:
        print(prompt + done.text)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from gptlab.data.prepare import prepare

    meta = prepare(args.sources, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, extensions=args.ext.split(","), text_field=args.text_field,
                   progress=not args.quiet)
    print(f"prepared {meta['documents']:,} documents ({meta['bytes'] / 1e6:.1f} MB) -> {meta['train_tokens']:,} "
          f"train + {meta['val_tokens']:,} val tokens ({meta['dtype']}, vocabulary {meta['vocab_size']:,}) in "
          f"{args.out}; {meta['seconds']:.1f} s, {meta['mb_per_s']:.2f} MB/s"
          + (f"; skipped {len(meta['skipped'])}" if meta["skipped"] else ""))
    return 0


def section_flags(args: argparse.Namespace) -> dict[str, str]:
    return {k: v for k, v in vars(args).items() if "." in k}


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gptlab.data.loader import TokenShards
    from gptlab.train.config import TrainConfig, merge_sections, model_config
    from gptlab.train.loop import Run, train

    if not args.data or not args.out:
        raise GptlabError("pretrain needs --data DIR and --out DIR (on the command line or in --config)")
    sections = merge_sections(args.config_sections, section_flags(args), args.config or "config")
    data = TokenShards(args.data)
    tokenizer = data.tokenizer()
    run = Run(model=model_config(sections["model"], tokenizer.vocab_size), train=TrainConfig(**sections["train"]),
              data=data, tokenizer=tokenizer, out=Path(args.out), resume=args.resume, progress=not args.quiet,
              inputs=(Path(args.data),))
    last = train(run)
    if int(os.environ.get("RANK", "0")) == 0 and "note" in last:
        print(f"nothing to do: {last['note']}")
    elif int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {last.get('step')}, loss {last.get('loss')}"
              + (f", val loss {last['val_loss']:.4f}" if "val_loss" in last else "")
              + f"; checkpoint, metrics.jsonl and loss.png in {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gptlab.checkpoint import check_folder
    from gptlab.serve import serve

    if not (Path(args.checkpoint) / "adapter_config.json").is_file():  # a fine-tuned run loads with its base
        check_folder(args.checkpoint)
    serve(args.checkpoint, host=args.host, port=args.port, api_key=args.api_key,
          max_concurrency=args.max_concurrency, device=args.device, dtype=args.dtype, max_rows=args.max_rows,
          max_queued=args.max_queued, max_prompt_chars=args.max_prompt_chars, prefill_chunk=args.prefill_chunk,
          guardrails=args.guardrails, index=args.index, index_k=args.index_k)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from gptlab.finetuning import finetune
    from gptlab.train.config import merge_sections

    if not args.data or not args.out:
        raise GptlabError("finetune needs --data FILE and --out DIR (on the command line or in --config)")
    sections = merge_sections(args.config_sections, section_flags(args), args.config or "config")
    last = finetune(args.checkpoint, args.data, args.out, method=args.method, val_data=args.val_data,
                    val_fraction=args.val_fraction, task_token=args.task_token, skip_bad_lines=args.skip_bad_lines,
                    resume=args.resume, progress=not args.quiet, sections=sections)
    if int(os.environ.get("RANK", "0")) == 0 and "note" in last:
        print(f"nothing to do: {last['note']}")
    elif int(os.environ.get("RANK", "0")) == 0:
        print(f"done ({args.method}): step {last.get('step')}, loss {last.get('loss')}"
              + (f", val loss {last['val_loss']:.4f}" if "val_loss" in last else "") + f"; checkpoint in {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from gptlab.checkpoint import check_folder
    from gptlab.compare import compare

    check_folder(args.checkpoint)
    for template in (*(args.template or ()), args.autoprompt_template):
        _check_text("--template", template)
    rows = compare(args.checkpoint, args.data, [m.strip() for m in args.methods.split(",") if m.strip()],
                   args.steps, args.out, lr=args.lr, batch_size=args.batch_size, task_token=args.task_token,
                   templates=args.template, autoprompt_template=args.autoprompt_template)
    print((Path(args.out) / "report.md").read_text())
    print(f"table: {Path(args.out) / 'report.md'}; chart: {Path(args.out) / 'compare.png'}; runs: {args.out}/METHOD/")
    return 0 if rows else 1


def cmd_autoprompt(args: argparse.Namespace) -> int:
    from gptlab.autoprompt import autoprompt
    from gptlab.train.config import AutoPromptConfig

    _check_text("--template", args.template)
    settings = AutoPromptConfig(steps=args.steps, candidates=args.candidates, batch_size=args.batch_size,
                                seed=args.seed, val_fraction=args.val_fraction, device=args.device)
    r = autoprompt(args.checkpoint, args.data, args.template, args.out, settings, task_token=args.task_token,
                   progress=not args.quiet)
    print(f"prompt: {r['prompt']}")
    print(f"held-out loss {r['val_loss']:.4f} on {r['val_examples']} examples (the random start "
          f"{r['start']['prompt']!r}: {r['start']['val_loss']:.4f}); {r['changes']} of {len(r['steps'])} steps "
          f"changed a trigger, {r['ms_per_step'] / 1000:.2f} s per step")
    if args.out:
        print(f"written: {Path(args.out) / 'template.txt'} and {Path(args.out) / 'autoprompt.json'}; score it with "
              f"`gptlab evaluate {args.checkpoint} --data {args.data} --template {Path(args.out) / 'template.txt'}`")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from gptlab.api import load
    from gptlab.data.loader import TokenShards
    from gptlab.evaluate import evaluate_task, perplexity
    from gptlab.finetuning import task_examples
    from gptlab.prompts import resolve_template

    if Path(args.data).is_dir() and args.template:
        raise GptlabError(f"{args.data} is a prepared data folder, scored by perplexity; --template is for task data")
    if args.strategy:
        return _evaluate_strategies(args)
    llm = load(args.checkpoint, device=args.device)
    if Path(args.data).is_dir():
        shards = TokenShards(args.data)
        shards.check_tokenizer(llm.tokenizer, args.checkpoint)
        result = perplexity(llm, shards, split=args.split)
    else:
        examples = task_examples(args.data, args.task_token)
        template = resolve_template(args.template) if args.template else None
        result = evaluate_task(llm, examples, template, shots=args.shots, lang=args.lang, limit=args.limit,
                               metrics=args.metrics.split(","))
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        for key, value in result.items():
            if key != "samples":
                print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
        for sample in result.get("samples", []):
            print(f"- {sample['prompt'][-60:]!r} -> {sample['prediction']!r} (reference {sample['reference']!r})")
    return 0


def _evaluate_strategies(args: argparse.Namespace) -> int:
    """`evaluate --strategy a,b,...`: each prompting strategy on the same questions; a table, and report.md in --out."""
    from gptlab.api import load
    from gptlab.files import atomic_write_text, check_new_folder, write_folder
    from gptlab.finetuning import task_examples
    from gptlab.strategies import evaluate_strategies, report, strategy

    if Path(args.data).is_dir() or args.template:
        raise GptlabError("--strategy takes question/answer task data (a file or a built-in task such as "
                          "arithmetic), without --template: each strategy builds its own prompts")
    strategies = [strategy(name.strip(), shots=args.shots or None, samples=args.samples)
                  for name in args.strategy.split(",") if name.strip()]
    if args.out:
        check_new_folder(args.out, [args.checkpoint, args.data])
    retrieve = None
    if args.index:
        from gptlab.rag import Index

        index = Index.load(args.index)

        def retrieve(question: str) -> list[str]:
            return [h.passage for h in index.search(question, k=3)]
    examples = task_examples(args.data, args.task_token)
    llm = load(args.checkpoint, device=args.device)
    rows = evaluate_strategies(llm, examples, strategies, limit=args.limit, max_new_tokens=args.max_new_tokens,
                               retrieve=retrieve)
    text = report(rows, args.checkpoint, args.data)
    if args.out:
        def write(root: Path) -> None:
            atomic_write_text(root / "report.md", text)
            atomic_write_text(root / "results.json", json.dumps(rows, indent=2, ensure_ascii=False) + "\n")

        write_folder(args.out, write, [args.checkpoint, args.data])
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
    else:
        print("\n".join(line for line in text.splitlines() if line.startswith("|")))
        if args.out:
            print(f"report.md and results.json in {args.out}")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from gptlab.agent import llm_generator, local_client, react, tool_agent
    from gptlab.tools import make_tools

    _check_text("the question", args.question)
    index = None
    if args.index:
        from gptlab.rag import Index

        index = Index.load(args.index)
    tools = make_tools([t.strip() for t in args.tools.split(",") if t.strip()], index, args.python_timeout,
                       args.python_memory_mb)
    if args.transcript and Path(args.transcript).exists():
        raise GptlabError(f"{args.transcript} already exists; choose a new file for the transcript")
    llm = None
    if not args.base_url:
        from gptlab.api import load

        llm = load(args.checkpoint, device=args.device)
    rails = _rails(args, llm)
    question = _guarded_input(rails, args.question)
    if question is None:
        return 0
    if args.base_url:  # a model behind an OpenAI-compatible server: its tool calls
        import openai

        client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key or "none", max_retries=0)
        transcript = tool_agent(client, args.checkpoint, question, tools, args.max_steps, args.max_new_tokens)
    elif args.mode == "tools":
        transcript = tool_agent(local_client(llm), "local", question, tools, args.max_steps, args.max_new_tokens)
    else:
        transcript = react(llm_generator(llm, args.max_new_tokens), question, tools, args.max_steps)
    if rails is not None and transcript.answer:
        transcript.answer = rails.check_output(transcript.answer, prompt=question).text
    if args.transcript:
        from gptlab.files import atomic_write_text

        atomic_write_text(args.transcript, json.dumps(transcript.to_dict(), indent=2, ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps(transcript.to_dict(), ensure_ascii=False))
        return 0
    for step in transcript.steps:
        if step.thought:
            print(f"Thought: {step.thought}")
        if step.action and step.action != "Finish":
            print(f"Action: {step.action}[{step.input if isinstance(step.input, str) else json.dumps(step.input)}]")
            print(f"Observation: {step.observation}")
    why = {"step_limit": f"stopped at the {args.max_steps}-step limit", "no_action": "the model wrote no action"}
    print(f"Answer: {transcript.answer}" if transcript.answer else f"(no answer: {why.get(transcript.stopped)})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from gptlab.quant.formats import QuantSpec
    from gptlab.quant.report import quantize_checkpoint, report

    if args.report:
        if args.scheme or args.double_quant:
            raise GptlabError("--report measures every scheme; leave out --scheme and --double-quant")
        _, table, folder = report(args.checkpoint, args.data, args.group_size, args.out, args.max_tokens)
        print(table)
        if folder is not None:
            print(f"written: {folder / 'quantize-report.md'} and {folder / 'quantize-report.json'}")
        return 0
    if not args.scheme or not args.out:
        raise GptlabError("quantize needs --scheme and --out DIR (or --report)")
    spec = QuantSpec(args.scheme, args.group_size, args.double_quant)
    out = quantize_checkpoint(args.checkpoint, args.out, spec)
    size = sum(f.stat().st_size for f in out.iterdir())
    group = spec.group_size or ("one row" if args.scheme == "int8" else 64)
    print(f"quantized {args.checkpoint} -> {out} ({args.scheme}, group {group}"
          + (", double-quantized scales" if args.double_quant else "") + f"; {size / 2**20:.2f} MiB)")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from gptlab.interop.hub import download

    path = download(args.repo_id, args.revision)
    print(f"downloaded {args.repo_id} -> {path}")
    if args.out:
        from gptlab.interop.hf import import_hf

        print(f"imported -> {import_hf(path, args.out, source=args.repo_id)}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    if args.format == "peft":
        from gptlab.interop.peft import import_peft

        if not args.base:
            raise GptlabError("import peft needs --base CHECKPOINT: the gptlab model the adapter was trained on")
        out = import_peft(args.src, args.base, args.out)
        print(f"imported {args.src} onto {args.base} -> {out} (a LoRA run: generate, serve and export hf merge it)")
        return 0
    from gptlab.interop.hf import import_hf

    out = import_hf(args.src, args.out)
    print(f"imported {args.src} -> {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        from gptlab.interop.gguf import export_gguf

        out = export_gguf(args.checkpoint, args.out, args.dtype)
        print(f"exported {args.checkpoint} -> {out} (GGUF, {args.dtype}; {out.stat().st_size / 2**20:.2f} MiB)")
        return 0
    if args.format == "peft":
        from gptlab.interop.peft import export_peft

        out = export_peft(args.checkpoint, args.out)
        print(f"exported {args.checkpoint} -> {out} (a peft LoRA adapter for the Hugging Face export of its base)")
        return 0
    from gptlab.interop.hf import export_hf

    out = export_hf(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out} (Hugging Face transformers format)")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from gptlab.rag import Index

    extensions = args.ext.split(",") if args.ext else None
    index = Index.build(args.sources, args.out, dense=args.dense, passage_chars=args.passage_chars,
                        overlap=args.overlap, stemmer=args.stemmer, extensions=extensions, text_field=args.text_field,
                        update=args.update, device=args.device, progress=not args.quiet)
    m, last = index.manifest, index.manifest["last_build"]
    dense = f" + {m['dense']['dim']}-dim vectors from {m['dense']['path']}" if m["dense"] else ""
    print(f"{'added' if args.update else 'indexed'} {last['documents']:,} documents ({last['bytes'] / 1e6:.1f} MB) "
          f"-> {last['passages']:,} passages (BM25{dense}) in {args.out}, {m['passages']:,} passages in all; "
          f"{last['seconds']:.1f} s, {last['mb_per_s']:.2f} MB/s")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from gptlab.api import load
    from gptlab.rag import Index, ask, read_template

    _check_text("the question", args.question)
    template = read_template(args.template) if args.template else None
    index = Index.load(args.index, device=args.device)
    if index.vectors is None and args.dense:
        index.use_encoder(args.dense)  # an index without vectors takes no encoder: the error before the model loads
    if index.vectors is None and args.mode not in (None, "bm25"):
        index.search(args.question, args.k, args.mode)  # the same for a dense search
    llm = load(args.checkpoint, device=args.device, dtype=args.dtype)
    if args.dense or (index.vectors is not None and args.mode != "bm25"):
        encoder = args.dense or index.manifest["dense"]["path"]
        same = args.dtype is None and Path(encoder).resolve() == Path(args.checkpoint).resolve()
        index.use_encoder(encoder, llm=llm if same else None)  # the answering model read once when it embeds too
    rails = _rails(args, llm)
    question = _guarded_input(rails, args.question)
    if question is None:
        return 0
    answer = ask(index, llm, question, k=args.k, mode=args.mode, template=template,
                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    if rails is not None:
        answer.text = rails.check_output(answer.text, prompt=question).text
    if answer.left_out:
        print(f"gptlab: note: {answer.left_out} of the {len(answer.hits) + answer.left_out} passages were left out "
              "of the prompt to fit the model's context", file=sys.stderr)
    if args.json:
        print(json.dumps(answer.to_json(), ensure_ascii=False))
        return 0
    print(answer.text)
    print()
    if answer.sources:
        print("Sources:")
        print("\n".join(f"[{n}] {h.where}" for n, h in zip(answer.citations, answer.sources)))
    else:
        print("No source cited. Retrieved:" if answer.hits else "No passage was found for the question.")
        for n, h in enumerate(answer.hits, 1):
            print(f"[{n}] {h.where}")
    return 0


# -- parser ------------------------------------------------------------------------------------------------------
def _verb(sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int],
          help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of option values; flags override it")
    p.set_defaults(func=func)
    return p


def _methods() -> dict[str, type]:
    from gptlab.peft import METHODS

    return METHODS


def build_parser() -> argparse.ArgumentParser:
    from gptlab import __version__

    parser = _Parser(prog="gptlab", description="Prepare, train, fine-tune, quantize, generate with and export GPT "
                                                "language models.")
    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True

    p = _verb(sub, "presets", cmd_presets, "list the named model shapes with their parameter counts")
    p.add_argument("names", nargs="*", help="presets to show (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--sizes", action="store_true", help="also show the weights' size at fp32, fp16/bf16, int8, int4 "
                                                        "(every parameter at that width), and of gptlab's own NF4 "
                                                        "checkpoint (codes, scales, 16-bit embedding and head)")

    p = _verb(sub, "prepare", cmd_prepare, "tokenize text into train.bin / val.bin shards for pretraining")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="text file, folder (recursive), JSONL file, or `stdlib` (Python's own source)")
    p.add_argument("--out", required=True, help="new data folder")
    p.add_argument("--tokenizer", default="bpe", help="bpe (train one), char, or a tokenizer.json / folder")
    p.add_argument("--vocab-size", type=POSITIVE, default=4096, help="for a trained BPE")
    p.add_argument("--val-fraction", type=FRACTION, default=0.05)
    p.add_argument("--ext", default=",".join(DEFAULT_EXTENSIONS), help="file endings read from folders")
    p.add_argument("--text-field", default="text", help="the field of a JSONL record that holds the text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = _verb(sub, "pretrain", cmd_pretrain, "train a model from scratch on prepared data (torchrun for many GPUs)")
    p.add_argument("--data", help="prepared data folder (gptlab prepare)")
    p.add_argument("--out", help="run folder: checkpoint, metrics.jsonl, loss.png")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_section_flags(p)

    p = _verb(sub, "finetune", cmd_finetune, "fine-tune a checkpoint: full, LoRA, QLoRA, adapters, prefix and prompt "
                                             "tuning, DPO and ORPO, QAT")
    p.add_argument("checkpoint", help="base checkpoint folder")
    p.add_argument("--method", default="lora", help="one of: " + ", ".join(
        f"{name} (default --train.lr {cls.lr:g})" for name, cls in _methods().items()))
    p.add_argument("--data", help="JSONL / CSV (prompt, completion), Alpaca JSONL, chat JSONL (messages: rendered "
                                  "with the base's chat template, assistant turns scored), a text file, or a "
                                  "built-in task: stdlib-summaries, gettext-fr; dpo and orpo: JSONL of prompt, "
                                  "chosen, rejected (text, or a chat prompt), or stdlib-preferences; a prepared data "
                                  "folder (gptlab prepare --tokenizer CHECKPOINT): continued pretraining")
    p.add_argument("--val-data", help="validation file (default: --val-fraction of --data)")
    p.add_argument("--val-fraction", type=FRACTION, default=0.1)
    p.add_argument("--task-token", help='a token such as "<to-fr>" that splits a text line into prompt and completion')
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and report malformed lines, not stop")
    p.add_argument("--out", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_section_flags(p, ("train", "lora", "qlora", "prefix", "prompt", "adapter", "llama_adapter", "dpo", "orpo",
                          "qat"))

    from gptlab.autoprompt import DEFAULT_TEMPLATE
    from gptlab.train.config import AutoPromptConfig as AP

    p = _verb(sub, "compare", cmd_compare, "run several fine-tuning methods and hard prompts on the same data and "
                                           "budget; report.md")
    p.add_argument("checkpoint", help="base checkpoint folder")
    p.add_argument("--data", required=True, help="task data, as for finetune (or a built-in task)")
    p.add_argument("--methods", default="full,lora,adapter", help="comma-separated: fine-tuning methods (finetune "
                                                                  "--help), and autoprompt (a searched hard prompt)")
    p.add_argument("--template", action="append", help="a hand-written hard template row, scored on the frozen base "
                                                       "(a name, a text with {input}, or a template file); "
                                                       "repeatable")
    p.add_argument("--autoprompt-template", default=DEFAULT_TEMPLATE, help="the template autoprompt fills ([T]: a "
                                                                           "searched token)")
    p.add_argument("--steps", type=POSITIVE, default=200, help="training steps per method (autoprompt: search steps)")
    p.add_argument("--batch-size", type=POSITIVE, default=8)
    p.add_argument("--lr", type=_bounded(float, 0, above=True), default=None,
                   help="one learning rate for all (default: one per method)")
    p.add_argument("--task-token", default=None)
    p.add_argument("--out", required=True, help="folder for report.md, compare.png and one run per method")

    p = _verb(sub, "autoprompt", cmd_autoprompt, "search discrete trigger tokens for a prompt template on a frozen "
                                                 "model (AutoPrompt, Shin et al. 2020); writes a hard template")
    p.add_argument("checkpoint", help="checkpoint folder (base or fine-tuned); it is not changed")
    p.add_argument("--data", required=True, help="task data, as for finetune (or a built-in task): each example's "
                                                 "input fills {input}, its completion is the answer scored")
    p.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help="where the input and the searched tokens go: {input} and one [T] per trigger token, "
                        "optionally {answer} at the end (where the completion goes; without it, the completion "
                        f"follows as the model's continuation). Default: {DEFAULT_TEMPLATE!r}")
    p.add_argument("--steps", type=POSITIVE, default=AP.steps, help="greedy steps: each may change one trigger")
    p.add_argument("--candidates", type=POSITIVE, default=AP.candidates,
                   help="tokens re-scored per step (the top of the gradient's estimate), in one batched forward")
    p.add_argument("--batch-size", type=POSITIVE, default=AP.batch_size, help="training examples per step")
    p.add_argument("--seed", type=_bounded(int, 0, 2**63 - 1), default=AP.seed,
                   help="start triggers, batches and slots; the same seed gives the same prompt")
    p.add_argument("--val-fraction", type=_bounded(float, 0, 0.999999, above=True), default=AP.val_fraction,
                   help="held-out share, split as finetune splits it")
    p.add_argument("--task-token", default=None, help="as for finetune: splits a text line into input and answer")
    p.add_argument("--out", default=None, help="a new folder for template.txt (for evaluate --template) and "
                                               "autoprompt.json (without it the prompt is only printed)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = _verb(sub, "evaluate", cmd_evaluate, "perplexity on prepared shards, or task metrics under a prompt template")
    p.add_argument("checkpoint", help="checkpoint folder (base or fine-tuned)")
    p.add_argument("--data", required=True, help="a prepared data folder (perplexity), a task file or built-in task")
    p.add_argument("--split", default="val", choices=["train", "val"], help="for a data folder: train or val")
    p.add_argument("--template", default=None, help="translate-sentence, translate-pipe, translate-arrow, summarize, "
                                                    "to-fr, plain, your own text with {input}, or a template file "
                                                    "(such as the template.txt gptlab autoprompt writes)")
    p.add_argument("--shots", type=COUNT, default=0, help="few-shot examples placed before each query")
    p.add_argument("--lang", default="French", help="{lang} in the translation templates")
    p.add_argument("--limit", type=POSITIVE, default=100, help="examples scored")
    p.add_argument("--metrics", default="exact,bleu,chrf,rougeL")
    p.add_argument("--task-token", default=None)
    p.add_argument("--strategy", default=None, help="prompting strategies scored side by side on question/answer data, "
                                                    "e.g. zero-shot,few-shot,cot,self-consistency,dsp (--shots "
                                                    "sets their examples, default 3)")
    p.add_argument("--samples", type=POSITIVE, default=None, help="self-consistency: chains sampled per question "
                                                                  "(default 5)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=128, help="with --strategy: tokens per answer")
    p.add_argument("--index", default=None, help="with --strategy dsp: the index (gptlab index) it retrieves from")
    p.add_argument("--out", default=None, help="with --strategy: a new folder for report.md and results.json")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")

    p = _verb(sub, "agent", cmd_agent, "answer a question with tools: ReAct (Thought/Action/Observation) or "
                                       "OpenAI-style tool calls")
    p.add_argument("checkpoint", help="checkpoint folder (with --base-url: the served model's name)")
    p.add_argument("question")
    p.add_argument("--tools", default="calculator", help="calculator, search (needs --index), python (runs code in a "
                                                         "sandbox: only when named)")
    p.add_argument("--mode", choices=["react", "tools"], default="react", help="react: text steps; tools: tool calls "
                                                                               "through gptlab's server")
    p.add_argument("--index", default=None, help="an index folder (gptlab index) for the search tool")
    p.add_argument("--base-url", default=None, help="an OpenAI-compatible server's /v1 URL: tool calls there")
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-steps", type=POSITIVE, default=6)
    p.add_argument("--max-new-tokens", type=POSITIVE, default=128, help="tokens per step")
    p.add_argument("--python-timeout", type=_bounded(float, 0, above=True), default=5.0, help="seconds per run")
    p.add_argument("--python-memory-mb", type=POSITIVE, default=256)
    p.add_argument("--transcript", default=None, help="a new JSON file for the whole transcript")
    p.add_argument("--guardrails", metavar="POLICY", default=None, help="a guardrails policy file (YAML/JSON): input "
                                                                        "and output rails, see gptlab.guardrails")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")

    p = _verb(sub, "generate", cmd_generate, "generate text from a checkpoint")
    p.add_argument("checkpoint", help="checkpoint folder")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from the BOS or <|endoftext|>); with "
                                                "--chat, the user's message")
    p.add_argument("--chat", action="store_true", help="treat --prompt as a user message: rendered with the model's "
                                                       "chat template, the reply ends at its end-of-turn token")
    p.add_argument("--system", default=None, help="a system message before the user's (implies --chat)")
    p.add_argument("--max-new-tokens", type=COUNT, default=64)
    p.add_argument("--temperature", type=_bounded(float, 0), default=1.0, help="0 means greedy")
    p.add_argument("--top-k", type=POSITIVE, default=None)
    p.add_argument("--top-p", type=_bounded(float, 0, 1, above=True), default=None)
    p.add_argument("--repetition-penalty", type=_bounded(float, 0, above=True), default=1.0)
    p.add_argument("--seed", type=_bounded(int, 0, 2**63 - 1), default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable); not included in the output")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]} (the new tokens)')
    p.add_argument("--guardrails", metavar="POLICY", default=None, help="a guardrails policy file (YAML/JSON): input "
                                                                        "and output rails, see gptlab.guardrails")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")

    p = _verb(sub, "quantize", cmd_quantize, "quantize a checkpoint's Linear weights (int8, int4, nf4, fp4), or "
                                             "report size, perplexity and speed for every scheme")
    p.add_argument("checkpoint", help="a float checkpoint folder")
    p.add_argument("--scheme", choices=SCHEMES, help="int8 (per row), int4, nf4 or fp4 (groups of 64); int4 with "
                                                     "groups of 32, 64, ... exports to GGUF q4_0 code for code")
    p.add_argument("--group-size", type=POSITIVE, help="weights per scale along the input (default: 64 for 4-bit, one "
                                                  "row for int8); must divide every layer's width")
    p.add_argument("--double-quant", action="store_true", help="quantize the 4-bit scales too (QLoRA)")
    p.add_argument("--out", help="the new checkpoint folder (with --report: a new folder for "
                                          "quantize-report.md and .json; without it the report is only printed)")
    p.add_argument("--report", action="store_true", help="measure every scheme: size, perplexity, decode speed")
    p.add_argument("--data", help="a prepared data folder for the report's perplexity (its val split)")
    p.add_argument("--max-tokens", type=POSITIVE, default=20_000, help="val tokens the report scores")

    p = _verb(sub, "serve", cmd_serve, "serve a checkpoint over an OpenAI-compatible HTTP API, with a playground at /")
    p.add_argument("checkpoint", help="checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=PORT, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/ requests")
    p.add_argument("--max-concurrency", type=POSITIVE, default=32, help="completions decoded together in one batch "
                                                                         "(cache slots); more wait for a free slot")
    p.add_argument("--prefill-chunk", type=POSITIVE, default=256, help="prompt tokens prefilled per step between "
                                                                       "decode steps, so a long prompt does not stall "
                                                                       "the others")
    p.add_argument("--index", default=None, help="an index folder (gptlab index): passages retrieved into each chat "
                                                 "request, and the sources in the response")
    p.add_argument("--index-k", type=POSITIVE, default=4, help="with --index: passages retrieved per request")
    p.add_argument("--guardrails", metavar="POLICY", default=None, help="a guardrails policy file (YAML/JSON): input "
                                                                        "and output rails, see gptlab.guardrails")
    p.add_argument("--max-rows", type=POSITIVE, default=64, help="completions one request may ask for (prompts x n); "
                                                                 "more is a 400")
    p.add_argument("--max-queued", type=POSITIVE, default=256, help="completions one client (API key, else address) "
                                                                    "may have running or waiting; more is a 429")
    p.add_argument("--max-prompt-chars", type=POSITIVE, default=100_000, help="characters of one prompt or "
                                                                              "conversation; more is a 400")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)

    p = _verb(sub, "download", cmd_download, "fetch a model from the Hugging Face hub into the local cache")
    p.add_argument("repo_id", help="e.g. openai-community/gpt2")
    p.add_argument("--revision", default=None)
    p.add_argument("--out", default=None, help="also import it into this new checkpoint folder")

    p = _verb(sub, "import", cmd_import, "convert a Hugging Face model folder into a gptlab checkpoint, or a peft "
                                         "LoRA adapter into a gptlab LoRA run")
    p.add_argument("format", choices=["hf", "peft"], help="source format")
    p.add_argument("src", help="hf: a Hugging Face model folder (config.json, weights, tokenizer); peft: an adapter "
                               "folder (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("out", help="new checkpoint folder")
    p.add_argument("--base", help="peft: the gptlab checkpoint of the model the adapter was trained on")

    p = _verb(sub, "export", cmd_export, "write a checkpoint in another tool's format: hf (a transformers folder), "
                                         "peft (a LoRA run as a peft adapter) or gguf (one file for llama.cpp)")
    p.add_argument("format", choices=["hf", "peft", "gguf"], help="target format")
    p.add_argument("checkpoint", help="checkpoint folder (peft: a LoRA run)")
    p.add_argument("out", help="new output folder (hf, peft) or file (gguf, e.g. model.gguf)")
    p.add_argument("--dtype", default="f16", type=_gguf_dtype, metavar="{" + ",".join(DTYPES) + "}",
                   help="gguf: weight type, per tensor as llama.cpp's own tools choose (vectors stay f32, rows that "
                        "are not whole blocks of 32 f16; q4_0 keeps the head q8_0). A quantized checkpoint is "
                        "dequantized and quantized again, but int4 with groups of 32, 64, ... goes to q4_0 code for "
                        "code (only its scales round to f16). q4_k and q5_k: the gguf package cannot write them")
    from gptlab.rag.index import MODES
    from gptlab.rag.lexical import STEMMERS

    p = _verb(sub, "index", cmd_index, "index documents for retrieval: passages, BM25, and dense vectors if asked")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="text file, folder (recursive), JSONL file, or `stdlib` (Python's own source)")
    p.add_argument("--out", required=True, help="new index folder (with --update: the index to add to)")
    p.add_argument("--update", action="store_true", help="add the sources to the index in --out, with its settings "
                                                         "and encoder (the old passages' vectors are kept as they are)")
    p.add_argument("--dense", metavar="ENCODER", help="also embed the passages: a gptlab checkpoint folder, or a "
                                                      "sentence-transformers / Hugging Face encoder folder")
    p.add_argument("--passage-chars", type=POSITIVE, default=None, help="passage length in characters (default 800), "
                                                                        "cut at paragraph breaks and line ends")
    p.add_argument("--overlap", type=COUNT, default=None, help="characters of whole lines that consecutive passages "
                                                               "share (default 100; at most half a passage)")
    p.add_argument("--stemmer", choices=STEMMERS, default=None, help="BM25 words by their Porter stem (default), or "
                                                                     "as written")
    p.add_argument("--ext", default=None, help="file endings read from folders (default "
                                               f"{','.join(DEFAULT_EXTENSIONS)})")
    p.add_argument("--text-field", default=None, help="the field of a JSONL record that holds the text (default text)")
    p.add_argument("--device", default=None, help="for the encoder: cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = _verb(sub, "ask", cmd_ask, "answer a question from an index's passages with a model, citing them")
    p.add_argument("index", help="index folder (gptlab index)")
    p.add_argument("checkpoint", help="checkpoint folder of the model that answers")
    p.add_argument("question")
    p.add_argument("--k", type=POSITIVE, default=4, help="passages retrieved into the prompt")
    p.add_argument("--mode", choices=MODES, default=None, help="default: hybrid for an index with vectors, else bm25")
    p.add_argument("--template", metavar="FILE", help="prompt template, a text with {sources} and {question}")
    p.add_argument("--dense", metavar="ENCODER", help="the index's encoder, where it is now (default: where it was "
                                                      "when the index was built)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=256)
    p.add_argument("--temperature", type=_bounded(float, 0), default=0.0, help="0 means greedy (default)")
    p.add_argument("--seed", type=_bounded(int, 0, 2**63 - 1), default=None)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--json", action="store_true", help="print the answer, its citations and the passages as JSON")
    p.add_argument("--guardrails", metavar="POLICY", default=None, help="a guardrails policy file (YAML/JSON): input "
                                                                        "and output rails, see gptlab.guardrails")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        verbs = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        verb = argv[0] if argv and argv[0] in verbs else None
        if verb is None:
            parser.parse_args(argv)  # --help, --version, or a one-line error
            return 2
        args = _apply_config(verbs[verb], argv[1:])
        code = args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below and not at the interpreter's exit
        return code
    except GptlabError as e:
        print(f"gptlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gptlab presets --json | head`: the reader left; end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's final flush must not fail
        return 141
