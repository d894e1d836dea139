"""gptlab inside lm-evaluation-harness: the three request types on small local tasks, scored exactly as the
harness's own Hugging Face model (`hf`) scores the exported copy of the same checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from gptlab.interop.hf import export_hf

lm_eval = pytest.importorskip("lm_eval")

TASKS = {
    "gl_choice": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                  "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
    "gl_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
               "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                               {"metric": "bits_per_byte"}]},
    "gl_gen": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
               "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
               "metric_list": [{"metric": "exact_match"}]},
}


def docs(task: str) -> list[dict]:
    words = ["train", "ship", "station", "harbour", "noon", "dawn"]
    if task == "gl_choice":
        return [{"question": f"The {w} left the", "choices": [" station", " harbour", " noon"], "answer": i % 3}
                for i, w in enumerate(words)]
    if task == "gl_ppl":  # the first text is longer than the 96-token context: several rolling windows
        return [{"text": "The train left the station at noon. " * 12}, {"text": "def add(a, b):\n    return a + b"}]
    return [{"prompt": f"The {w} left the", "answer": " station"} for w in words]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("tasks")
    for name, spec in TASKS.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs(name)))
        config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                  "test_split": "test", **spec}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return root


def evaluate(model: str, model_args: dict, tasks_dir, monkeypatch) -> dict:
    from lm_eval.tasks import TaskManager

    import gptlab.harness  # noqa: F401  (registers the gptlab model)

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), batch_size=1,
                                   task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True,
                                   device="cpu")


def same(a, b) -> bool:
    """Equal structures; floats (log-likelihoods) to 1e-4, booleans and text exactly."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and not isinstance(b, bool):
        return a == pytest.approx(b, abs=1e-4)
    return a == b


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory, tokenizer):
    """An imported Llama whose tokenizer, of Llama 2's shape, starts every text with its BOS <s>."""
    from gptlab.interop.hf import import_hf

    from .test_hub_models import make_family

    root = tmp_path_factory.mktemp("llama")
    folder, _, _ = make_family("mistral", root, tokenizer)
    return import_hf(folder, root / "ckpt")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_scores_equal_the_harness_hf_model_on_the_exported_copy(hf_pair, llama_ckpt, tasks_dir, tmp_path,
                                                               monkeypatch, kind):
    """GPT-2 (no BOS) and a Llama whose tokenizer adds one: the BOS rule, the prefix token, the stop ids as the
    harness's `hf` model has them."""
    ckpt = hf_pair[1] if kind == "gpt2" else llama_ckpt
    export_hf(ckpt, tmp_path / "hf")
    ours = evaluate("gptlab", {"checkpoint": str(ckpt)}, tasks_dir, monkeypatch)
    theirs = evaluate("hf", {"pretrained": str(tmp_path / "hf"), "dtype": "float32"}, tasks_dir, monkeypatch)
    for task in TASKS:
        mine, ref = ours["results"][task], theirs["results"][task]
        metrics = [k for k in ref if "," in k and "stderr" not in k]
        assert metrics, ref
        for key in metrics:
            assert mine[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (task, key)
        # request by request: the same log-likelihoods and the same generated text
        assert len(ours["samples"][task]) == len(theirs["samples"][task]) == len(docs(task))
        for a, b in zip(ours["samples"][task], theirs["samples"][task]):
            assert same(a["resps"], b["resps"]), (task, a["resps"], b["resps"])
    assert ours["results"]["gl_ppl"]["word_perplexity,none"] > 1


def run_cli(argv: list[str], out) -> None:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gl_choice" in done.stdout and "acc" in done.stdout
    results = [json.loads(p.read_text()) for p in out.rglob("results*.json")]
    assert results and "acc,none" in results[0]["results"]["gl_choice"]


def test_the_bare_lm_eval_command_finds_the_gptlab_model(hf_pair, tasks_dir, tmp_path):
    """`lm_eval --model gptlab ...` as a user types it: the installed start-up hook registers the model."""
    if not (Path(sysconfig.get_paths()["purelib"]) / "gptlab-harness.pth").is_file():
        pytest.skip("gptlab-harness.pth is not installed here (a wheel install or `make install` puts it there)")
    _, ckpt = hf_pair
    lm_eval_cmd = str(Path(sys.executable).parent / "lm_eval")
    run_cli([lm_eval_cmd, "--model", "gptlab", "--model_args", f"checkpoint={ckpt}", "--tasks", "gl_choice",
             "--include_path", str(tasks_dir), "--output_path", str(tmp_path / "a"), "--device", "cpu"], tmp_path / "a")


def test_python_m_gptlab_harness_is_the_same_command(hf_pair, tasks_dir, tmp_path):
    _, ckpt = hf_pair
    run_cli([sys.executable, "-m", "gptlab.harness", "--model", "gptlab", "--model_args", f"checkpoint={ckpt}",
             "--tasks", "gl_choice", "--include_path", str(tasks_dir), "--output_path", str(tmp_path / "b")],
            tmp_path / "b")


def test_the_hook_stays_out_of_the_way(tmp_path):
    """The start-up hook imports nothing until lm_eval.models is imported, and then only registers a lazy entry."""
    code = ("import sys, site; site.addsitedir(sys.argv[1]); "
            "assert 'torch' not in sys.modules and 'gptlab' not in sys.modules; "
            "import lm_eval.models; from lm_eval.api.registry import model_registry; "
            "assert 'gptlab' not in sys.modules; "
            "assert model_registry.get('gptlab').__module__ == 'gptlab.harness' and model_registry.get('hf')")
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    root = Path(__file__).resolve().parents[1]
    for name in ("gptlab-harness.pth", "gptlab_harness_hook.py"):
        shutil.copy(root / name, site_dir / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-S", "-c", "import site; site.main(); " + code, str(site_dir)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
