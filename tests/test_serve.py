"""The server, called with the official `openai` client, as users call it."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import gptlab
from gptlab.api import LLM
from gptlab.checkpoint import save_checkpoint
from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.model import GPT
from gptlab.serve import Server, create_app

openai = pytest.importorskip("openai")
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=tokenizer.vocab_size)
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", GPT(cfg), tokenizer)


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    return gptlab.load(checkpoint, device="cpu")  # as `gptlab serve` loads it


@pytest.fixture(scope="module")
def server(llm) -> Server:
    return Server(llm, "tiny", max_concurrency=2)


@pytest.fixture(scope="module")
def base_url(server):
    import uvicorn

    port = free_port()
    app = create_app(server, api_key=KEY)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list()] == ["tiny"]
    with urllib.request.urlopen(f"{base_url}/health") as r:
        assert json.load(r) == {"status": "ok"}


def test_greedy_completion_equals_gptlab_generate(client, llm, checkpoint, capsys):
    r = client.completions.create(model="tiny", prompt="The train left", max_tokens=20, temperature=0)
    assert main(["generate", str(checkpoint), "--prompt", "The train left", "--max-new-tokens", "20",
                 "--temperature", "0", "--device", "cpu", "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert r.choices[0].text == want["text"]
    assert r.usage.completion_tokens == len(want["token_ids"])
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode("The train left"))
    assert r.choices[0].finish_reason in ("length", "stop")


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model="tiny", prompt="def add(a, b):", max_tokens=30, temperature=0.9, seed=11)
    full = client.completions.create(**kwargs).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs)]
    assert "".join(pieces) == full and len(pieces) > 2


def test_seeded_sampling_is_reproducible_and_n_choices(client):
    kwargs = dict(model="tiny", prompt="Le train", max_tokens=15, temperature=1.0, top_p=0.9, seed=5, n=3)
    a = [c.text for c in client.completions.create(**kwargs).choices]
    b = [c.text for c in client.completions.create(**kwargs).choices]
    assert a == b and len(a) == 3 and len(set(a)) > 1


def test_stop_sequences(client, llm):
    (full,) = llm.complete("The", max_new_tokens=40, temperature=0)
    stop = full.text[8:11]
    r = client.completions.create(model="tiny", prompt="The", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == full.text[: full.text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_chat_and_chat_streaming(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == r.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None


def test_sixteen_concurrent_streams_equal_their_sequential_results(client):
    prompts = [f"The train number {i} left" for i in range(16)]

    def run(p: str, stream: bool) -> str:
        kwargs = dict(model="tiny", prompt=p, max_tokens=24, temperature=0.8, seed=1)
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
        return client.completions.create(**kwargs).choices[0].text

    sequential = [run(p, False) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda p: run(p, True), prompts))
    assert concurrent == sequential


def test_a_client_that_disconnects_frees_its_slot(client, server):
    """Streams dropped after their first chunk stop generating (their runs end early, freeing the slots), and new
    requests complete."""
    before = server.abandoned
    for _ in range(2):
        stream = client.completions.create(model="tiny", prompt="x", max_tokens=120, temperature=1.0, stream=True)
        next(iter(stream))
        stream.close()
    deadline = time.time() + 10
    while server.abandoned < before + 2 and time.time() < deadline:
        time.sleep(0.01)
    assert server.abandoned == before + 2
    r = client.completions.create(model="tiny", prompt="y", max_tokens=5, temperature=0, timeout=20)
    assert r.choices[0].text is not None


def post(base_url: str, path: str, body: bytes | str, key: str | None = KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else body.encode()
    req = urllib.request.Request(f"{base_url}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.mark.parametrize("path,body,key,status,needle", [
    ("/v1/completions", '{"prompt": "hi"}', None, 401, "Incorrect API key"),
    ("/v1/completions", '{"prompt": "hi"}', "wrong", 401, "Incorrect API key"),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": "ten"}', KEY, 400, "max_tokens"),
    ("/v1/completions", '{"prompt": 5}', KEY, 400, "prompt"),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 5000}', KEY, 400, "maximum context length is 128"),
    ("/v1/completions", '{"prompt": "hi", "temperature": -1}', KEY, 400, "temperature"),
    ("/v1/completions", '{"prompt": "' + "x" * 100_001 + '"}', KEY, 400, "at most 100000"),
    ("/v1/completions", '{"prompt": "hi", ', KEY, 400, "not valid JSON"),
    ("/v1/chat/completions", '{"messages": []}', KEY, 400, "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "robot", "content": "x"}]}', KEY, 400, "messages"),
    ("/v1/completions", '{"prompt": "a\\ud800b"}', KEY, 400, "lone surrogate"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}', KEY, 400, "lone surrogate"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     KEY, 400, "lone surrogate"),
    ("/v1/completions", '{"prompt": "hi", "stop": ["\\ud800"]}', KEY, 400, "lone surrogate"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
     '{"url": "x"}}]}]}', KEY, 400, "type 'image_url': this model reads text parts only"),
    ("/v1/completions", '{"prompt": "hi", "seed": 18446744073709551616}', KEY, 400, "seed"),
    ("/v1/completions", '{"prompt": "hi", "model": "gpt-4o"}', KEY, 404, "`gpt-4o` does not exist"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "model": "other"}', KEY, 404,
     "does not exist"),
    ("/v1/completions", json.dumps({"prompt": ["a"] * 2000, "n": 16}), KEY, 400, "at most 64 per request"),
    ("/v1/completions", '{"prompt": [1, 2, 99999]}', KEY, 400, "outside the vocabulary"),
    ("/v1/completions", '{"prompt": [[]]}', KEY, 400, "must not be empty"),
])
def test_bad_requests_get_openai_errors(base_url, path, body, key, status, needle):
    code, payload = post(base_url, path, body, key)
    assert code == status
    assert set(payload["error"]) >= {"message", "type", "param", "code"} and needle in payload["error"]["message"] + \
        str(payload["error"]["param"])


def test_no_schema_pages_and_unknown_paths_get_openai_errors(base_url):
    for path in ("/openapi.json", "/docs", "/v1/nothing"):
        try:
            urllib.request.urlopen(urllib.request.Request(f"{base_url}{path}",
                                                          headers={"Authorization": f"Bearer {KEY}"}))
            raise AssertionError(path)
        except urllib.error.HTTPError as e:
            assert e.code == 404 and set(json.load(e)["error"]) >= {"message", "type", "param", "code"}


def test_token_id_prompts_and_text_parts_are_what_their_text_is(client, llm):
    text = "The train left"
    ids = llm.engine.encode(text)
    kwargs = dict(model="tiny", max_tokens=8, temperature=0)
    by_text = client.completions.create(prompt=text, **kwargs).choices[0].text
    assert client.completions.create(prompt=ids, **kwargs).choices[0].text == by_text
    assert [c.text for c in client.completions.create(prompt=[ids, ids], **kwargs).choices] == [by_text] * 2
    plain = client.chat.completions.create(messages=[{"role": "user", "content": "Hello there"}], **kwargs)
    parts = client.chat.completions.create(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}], **kwargs)
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_a_client_gets_429_past_its_queued_work(llm):
    """Rows (prompts x n) running or waiting are counted per client (its key, else its address)."""
    from fastapi.testclient import TestClient

    app = create_app(Server(llm, "tiny", max_rows=8, max_queued=4))
    with TestClient(app) as http:
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 5})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 4}).status_code == 200
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 4}).status_code == 200  # freed


def test_serving_beyond_loopback_without_a_key_warns(checkpoint, monkeypatch, capsys):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    assert main(["serve", str(checkpoint), "--host", "0.0.0.0"]) == 0
    assert "without --api-key" in capsys.readouterr().err
    assert main(["serve", str(checkpoint), "--host", "0.0.0.0", "--api-key", "k"]) == 0
    assert main(["serve", str(checkpoint)]) == 0
    assert "without --api-key" not in capsys.readouterr().err


def test_a_chat_template_that_does_not_compile_stops_the_server_at_start(checkpoint, tmp_path, monkeypatch, capsys):
    import shutil

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "chat_template.jinja").write_text("{% if %}")
    assert main(["serve", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chat template" in err


def test_a_template_that_fails_while_rendering_is_a_400(checkpoint, tmp_path):
    """Template code that raises (here a division by zero on an assistant turn) is the request's fault, not a 500."""
    import shutil

    from fastapi.testclient import TestClient

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "chat_template.jinja").write_text("{% for m in messages %}{% if m.role == 'assistant' %}{{ 1 / 0 }}"
                                                "{% endif %}{{ m.content }}{% endfor %}")
    with TestClient(create_app(Server(gptlab.load(broken, device="cpu"), "broken"))) as http:
        ok = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert ok.status_code == 200
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}, {
            "role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "max_tokens": 2})
        assert r.status_code == 400 and "ZeroDivisionError" in r.json()["error"]["message"]


def test_a_fine_tuned_run_is_served_with_its_base(checkpoint, tmp_path, monkeypatch):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **k: served.setdefault("app", app))
    (tmp_path / "task.jsonl").write_text("".join(f'{{"prompt": "a{i}", "completion": "b"}}\n' for i in range(8)))
    assert main(["finetune", str(checkpoint), "--data", str(tmp_path / "task.jsonl"), "--out", str(tmp_path / "lora"),
                 "--quiet", "--train.max_steps=1", "--train.batch_size=2", "--train.eval_every=0"]) == 0
    assert main(["serve", str(tmp_path / "lora")]) == 0 and "app" in served


def test_unknown_fields_are_ignored(base_url):
    code, payload = post(base_url, "/v1/completions", '{"prompt": "hi", "max_tokens": 3, "logit_bias": {}, '
                                                     '"frequency_penalty": 0.5, "user": "me"}')
    assert code == 200 and payload["usage"]["completion_tokens"] <= 3


def test_playground_page_is_served(base_url):
    with urllib.request.urlopen(f"{base_url}/") as r:
        page = r.read().decode()
    assert "gptlab playground" in page and "/v1/completions" in page


def test_playground_streams_text_in_a_real_browser(base_url):
    """Headless Chromium loads the page, types the API key, clicks Generate, and streamed text appears."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.get(base_url + "/")
        driver.find_element(By.ID, "api_key").send_keys(KEY)
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("The train left")
        driver.find_element(By.ID, "temperature").clear()
        driver.find_element(By.ID, "temperature").send_keys("0")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "status").text in ("done",) or
                                        d.find_element(By.ID, "status").text.startswith("error"))
        assert driver.find_element(By.ID, "status").text == "done"
        shown = driver.find_element(By.ID, "output").text
        assert shown.startswith("The train left") and len(shown) > len("The train left")
        assert "tiny" in driver.find_element(By.ID, "model").text
    finally:
        driver.quit()
