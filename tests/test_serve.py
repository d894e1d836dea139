"""The server, called with the official `openai` client, as users call it."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

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
    return Server(llm, "tiny")  # 16 slots: concurrent requests share decode steps


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


@pytest.fixture(scope="module")
def endless(tokenizer):
    """A server on a model that, greedy, never writes an end-of-text token, so that a row ends before max_tokens only
    because its client went away: (server, port). (Sampled, its end-of-text token has a chance of e^-10 a step.)"""
    import uvicorn

    from tests.test_agent import Scripted

    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=4096, vocab_size=tokenizer.vocab_size)
    never_ends = Scripted(cfg, [tokenizer.encode("x", special=False)]).eval()  # no end-of-text token, ever
    server, port = Server(LLM(never_ends, tokenizer), "tiny"), free_port()
    http = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=http.run, daemon=True).start()
    while not http.started:
        time.sleep(0.02)
    yield server, port
    http.should_exit = True


def wait_until_idle(server: Server, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while any(server.scheduler.running) and time.time() < deadline:
        time.sleep(0.02)


def test_a_client_that_disconnects_frees_its_slot(endless):
    """Streams dropped after their first chunk stop generating (their rows are dropped at the next step, freeing the
    slots), and new requests complete."""
    server, port = endless
    wait_until_idle(server)
    before = server.abandoned
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    for _ in range(2):
        stream = client.completions.create(model="tiny", prompt="x", max_tokens=2000, temperature=0, stream=True)
        next(iter(stream))
        stream.close()
    deadline = time.time() + 20
    while server.abandoned < before + 2 and time.time() < deadline:
        time.sleep(0.01)
    assert server.abandoned == before + 2 and not any(server.scheduler.running)
    r = client.completions.create(model="tiny", prompt="y", max_tokens=5, temperature=0, timeout=20)
    assert r.choices[0].text == "xxxxx" and r.choices[0].finish_reason == "length"


def test_a_waiting_client_that_goes_away_stops_its_generation(endless):
    """A non-streaming request whose connection closes is noticed while it generates and its rows are dropped."""
    server, port = endless
    wait_until_idle(server)
    before, steps = server.abandoned, server.scheduler.steps
    body = json.dumps({"prompt": "x", "max_tokens": 2000, "n": 3, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.time() + 20
        while server.scheduler.steps < steps + 5 and time.time() < deadline:  # generating before the client goes
            time.sleep(0.01)
    wait_until_idle(server)
    assert not any(server.scheduler.running) and server.abandoned == before + 3
    assert server.scheduler.steps < steps + 1900


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


@pytest.mark.parametrize("body,needle", [
    ('{"prompt": "hi", "frequency_penalty": 0.5}', "`frequency_penalty` is not implemented"),
    ('{"prompt": "hi", "logit_bias": {"1": 5}}', "`logit_bias` is not implemented"),
    ('{"prompt": "hi", "best_of": 3}', "`best_of` is not implemented"),
    ('{"prompt": "hi", "echo": true}', "`echo` is not implemented"),
    ('{"prompt": "hi", "some_new_option": 1}', "`some_new_option` is not a parameter this server implements"),
])
def test_parameters_gptlab_does_not_implement_are_a_400_naming_them(base_url, body, needle):
    code, payload = post(base_url, "/v1/completions", body)
    assert code == 400 and needle in payload["error"]["message"], payload
    # their no-op values are accepted, as is an end-user id
    code, payload = post(base_url, "/v1/completions", '{"prompt": "hi", "max_tokens": 3, "logit_bias": {}, '
                                                     '"frequency_penalty": 0, "best_of": 1, "user": "me"}')
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


# -- continuous batching -------------------------------------------------------------------------------------------
def _run(scheduler, rows, timeout: float = 60.0):
    """Submit rows to a scheduler and wait for all of them; returns their (text, token ids)."""
    done = threading.Semaphore(0)
    for r in rows:
        r.on_done = lambda _r: done.release()
    scheduler.submit(rows)
    for _ in rows:
        assert done.acquire(timeout=timeout)
    return [(r.text.text, list(r.text.token_ids)) for r in rows]


def _row(llm, prompt: str, max_tokens: int, temperature: float = 0.0, seed: int | None = None, **kw):
    from gptlab.batching import Row
    from gptlab.generate import SamplingParams, TextStream

    return Row(llm.engine.encode(prompt), SamplingParams(temperature=temperature, top_p=0.9 if temperature else None),
               max_tokens, TextStream(llm.tokenizer, (), llm.tokenizer.stop_ids), lambda *_: None, lambda *_: None,
               seed=seed, **kw)


def test_rows_decoded_together_equal_each_row_alone(llm):
    """16 rows of different lengths, greedy and seeded sampling, share decode steps (the scheduler ran them in one
    batch) and each gives what it gives alone; a greedy row equals the offline engine's answer."""
    from gptlab.batching import Scheduler

    scheduler = Scheduler(llm.model, slots=16)
    specs = [(f"The train number {i} left" + " again" * (i % 5), 8 + 3 * (i % 4), 0.8 * (i % 2), i) for i in range(16)]
    alone = [_run(scheduler, [_row(llm, p, m, t, s)])[0] for p, m, t, s in specs]
    before = scheduler.widest
    together = _run(scheduler, [_row(llm, p, m, t, s) for p, m, t, s in specs])
    assert together == alone
    assert scheduler.widest > max(before, 4)
    (want,) = llm.complete(specs[0][0], max_new_tokens=specs[0][1], temperature=0)
    assert alone[0] == (want.text, want.token_ids)


def test_chunked_prefill_gives_the_same_tokens_and_lets_others_decode(llm):
    from gptlab.batching import Scheduler

    long_prompt = "The ship left the harbour at dawn. " * 6
    whole = _run(Scheduler(llm.model, slots=4, prefill_chunk=512), [_row(llm, long_prompt, 10)])
    chunked = Scheduler(llm.model, slots=4, prefill_chunk=8)
    assert _run(chunked, [_row(llm, long_prompt, 10)]) == whole
    seen = []
    short, long_ = _row(llm, "x", 40), _row(llm, long_prompt, 4)
    short.on_piece = lambda r, p: seen.append("short")
    long_.on_piece = lambda r, p: seen.append("long")
    _run(chunked, [short, long_])
    assert len(llm.engine.encode(long_prompt)) > 8 * 6
    assert seen.index("long") >= 4  # the short row went on decoding while the long prompt was prefilled


def test_a_failing_step_fails_its_rows_and_the_engine_goes_on(llm, monkeypatch):
    from gptlab.batching import Scheduler

    scheduler = Scheduler(llm.model, slots=2)
    real = scheduler._decode
    monkeypatch.setattr(scheduler, "_decode", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    (row,) = rows = [_row(llm, "hi", 5)]
    _run(scheduler, rows)
    assert row.error == "RuntimeError: boom"
    monkeypatch.setattr(scheduler, "_decode", real)
    assert _run(scheduler, [_row(llm, "hi", 5)])[0][1]


# -- the OpenAI API as agent frameworks use it ------------------------------------------------------------------
def _forward_logprobs(llm, prompt_ids: list[int], new_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + new_ids])
    with torch.no_grad():
        logits = llm.model(ids)[0, len(prompt_ids) - 1: -1].float().log_softmax(-1)  # (new, vocab)
    return logits


def test_logprobs_equal_a_forward_pass_of_the_same_tokens(client, llm):
    prompt = "The train left"
    (want,) = llm.complete(prompt, max_new_tokens=12, temperature=0)
    ids = [t for t in want.token_ids if t not in llm.tokenizer.stop_ids]
    ref = _forward_logprobs(llm, llm.engine.encode(prompt), ids)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids)
    assert torch.allclose(torch.tensor(lp.token_logprobs), ref[torch.arange(len(ids)), ids], atol=1e-4)
    assert [len(t) for t in lp.top_logprobs] == [3] * len(ids) or all(len(t) <= 3 for t in lp.top_logprobs)
    assert max(lp.top_logprobs[0].values()) == pytest.approx(float(ref[0].max()), abs=1e-4)
    assert "".join(lp.tokens) == r.choices[0].text

    messages = [{"role": "user", "content": "Hello there"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                          logprobs=True, top_logprobs=5)
    content = chat.choices[0].logprobs.content
    chat_ids = llm.tokenizer.encode(chat.choices[0].message.content, special=False)
    prompt_ids = llm.tokenizer.encode_chat(messages)
    ref = _forward_logprobs(llm, prompt_ids, chat_ids)
    if len(content) == len(chat_ids):  # the text re-encodes to the tokens generated
        assert torch.allclose(torch.tensor([c.logprob for c in content]), ref[torch.arange(len(chat_ids)), chat_ids],
                              atol=1e-4)
    assert all(len(c.top_logprobs) == 5 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    assert b"".join(bytes(c.bytes) for c in content).decode(errors="replace") == chat.choices[0].message.content
    streamed = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                   logprobs=True, top_logprobs=2, stream=True))
    got = [c.logprob for ch in streamed if ch.choices and ch.choices[0].logprobs
           for c in ch.choices[0].logprobs.content]
    assert got == pytest.approx([c.logprob for c in content], abs=1e-6)


def test_stream_options_include_usage(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    assert all(c.usage is None for c in chunks[:-1])


def _valid(value, schema) -> bool:
    """What the test schemas need of JSON Schema: objects with required keys, enums, bounded ints, short strings."""
    t = schema.get("type")
    if "enum" in schema:
        return value in schema["enum"]
    if t == "object":
        props = schema.get("properties", {})
        return isinstance(value, dict) and set(schema.get("required", [])) <= set(value) and \
            (schema.get("additionalProperties", True) or set(value) <= set(props)) and \
            all(_valid(value[k], props[k]) for k in value if k in props)
    if t == "integer":
        return isinstance(value, int) and schema.get("minimum", -1e99) <= value <= schema.get("maximum", 1e99)
    if t == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", 1e99)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "array":
        return isinstance(value, list) and all(_valid(v, schema["items"]) for v in value) and \
            len(value) <= schema.get("maxItems", 1e99)
    return True


SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 14}, "tags": {"type": "array", "maxItems": 2,
                                                                      "items": {"type": "boolean"}}},
    "required": ["city", "unit", "days", "tags"], "additionalProperties": False}


def test_a_schema_constrained_answer_parses_and_validates_even_from_a_random_model(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Weather?"}], max_tokens=80, temperature=1.0,
            seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}})
        value = json.loads(r.choices[0].message.content)
        assert _valid(value, SCHEMA) and r.choices[0].finish_reason == "stop", value
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=60,
                                       temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")


@pytest.fixture(scope="module")
def wide_llm(tokenizer, tmp_path_factory) -> LLM:
    """A 1-layer model with a context long enough for a prompt that lists tools, or for a long generation."""
    torch.manual_seed(1)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=2048, vocab_size=tokenizer.vocab_size)
    return gptlab.load(save_checkpoint(tmp_path_factory.mktemp("wide") / "wide", GPT(cfg), tokenizer), device="cpu")


@pytest.fixture(scope="module")
def wide(wide_llm):
    """The official OpenAI client on `wide_llm`, over starlette's test transport (the same requests, no socket)."""
    from fastapi.testclient import TestClient

    http = TestClient(create_app(Server(wide_llm, "tiny")), base_url="http://test")
    with http:
        yield openai.OpenAI(base_url="http://test/v1", api_key="none", http_client=http, max_retries=0)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": SCHEMA}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


def test_a_forced_tool_call_has_schema_valid_arguments_and_its_result_goes_back(wide):
    client = wide
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, CLOCK],
                                           tool_choice=choice, max_tokens=120, temperature=0.7, seed=3,
                                           parallel_tool_calls=False)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.id.startswith("call_")
        schema = {"get_weather": SCHEMA, "get_time": CLOCK["function"]["parameters"]}[call.function.name]
        assert _valid(json.loads(call.function.arguments), schema)
        if isinstance(choice, dict):
            assert call.function.name == "get_time"
    history = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                          {"role": "tool", "tool_call_id": call.id, "content": '{"time": "12:00"}'}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER, CLOCK], max_tokens=5,
                                       temperature=0)
    assert r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=[CLOCK], tool_choice="required",
                                                 max_tokens=120, temperature=0, stream=True, parallel_tool_calls=False))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].function.name == "get_time" and json.loads(calls[0].function.arguments)["zone"] in ("UTC", "CET")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("body,needle", [
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "`nope`"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"$ref": "#/missing"}}}}}], "tool_choice": "required"}, "tools:"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/missing"}}}}}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "needs its json_schema"),
    ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "cannot be combined"),
])
def test_bad_structured_requests_are_a_400_naming_the_field(base_url, body, needle):
    code, payload = post(base_url, "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **body}))
    assert code == 400 and needle in payload["error"]["message"], payload


def test_tools_are_rendered_by_a_template_that_shows_them(tmp_path):
    """A ChatML model (Qwen's template renders `tools`) gets them as transformers renders them; its forced call
    comes back as a tool call."""
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from tests import hub_tokenizers

    folder = hub_tokenizers.qwen(tmp_path / "qwen")
    from gptlab.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(folder)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=512, vocab_size=tok.vocab_size))
    save_checkpoint(tmp_path / "ckpt", model, tok)
    llm = gptlab.load(tmp_path / "ckpt", device="cpu")
    messages = [{"role": "user", "content": "Time?"}]
    want = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tools=[CLOCK],
                                                                     add_generation_prompt=True).input_ids
    with TestClient(create_app(Server(llm, "qwen"))) as http:
        r = http.post("/v1/chat/completions", json={"messages": messages, "tools": [CLOCK], "tool_choice": "required",
                                                    "max_tokens": 120, "temperature": 0, "parallel_tool_calls": False})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(want)
        (call,) = r.json()["choices"][0]["message"]["tool_calls"]
        assert json.loads(call["function"]["arguments"])["zone"] in ("UTC", "CET")


def test_langchain_bind_tools_gets_a_tool_call(wide):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.tools import tool

    @tool
    def get_time(zone: Literal["UTC", "CET"]) -> str:
        """The time in a zone."""
        return "12:00"

    llm = langchain_openai.ChatOpenAI(model="tiny", base_url="http://test/v1", api_key="none", max_tokens=150,
                                      temperature=0, max_retries=0, http_client=wide._client)
    reply = llm.bind_tools([get_time], tool_choice="get_time", parallel_tool_calls=False).invoke("Time in UTC?")
    (call,) = reply.tool_calls
    assert call["name"] == "get_time" and call["args"]["zone"] in ("UTC", "CET")


def test_embeddings_are_mean_pooled_unit_vectors(client, llm):
    import base64

    import numpy as np

    r = client.embeddings.create(model="tiny", input=["The train left", "Le train"])
    a, b = (np.array(d.embedding) for d in r.data)
    assert a.shape == (llm.model.config.n_embd,) and abs(np.linalg.norm(a) - 1) < 1e-5
    ids = llm.engine.encode("The train left")
    with torch.no_grad():
        hidden = llm.model(torch.tensor([ids]), features=True)[0].mean(0)
    assert np.allclose(a, torch.nn.functional.normalize(hidden, dim=0).numpy(), atol=1e-5)
    assert r.usage.prompt_tokens == len(ids) + len(llm.engine.encode("Le train"))
    raw = client.embeddings.with_raw_response.create(model="tiny", input=ids, encoding_format="base64")
    packed = json.loads(raw.text)["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(packed), dtype=np.float32), a, atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="tiny", input="x", dimensions=3)
    with pytest.raises(openai.BadRequestError, match="input"):
        client.embeddings.create(model="tiny", input=[])


def test_a_429_says_when_to_retry(llm):
    from fastapi.testclient import TestClient

    with TestClient(create_app(Server(llm, "tiny", max_rows=8, max_queued=4))) as http:
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 5})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"


# -- guardrails on the server -----------------------------------------------------------------------------------
def test_the_servers_rails_refuse_redact_and_cut_streams(tokenizer, tmp_path):
    """Input rails refuse in OpenAI's shape (finish_reason content_filter, message.refusal); output rails redact a
    reply, and end a stream at a blocked phrase that arrives across pieces."""
    from fastapi.testclient import TestClient

    from gptlab.guardrails import Guardrails
    from tests.test_agent import scripted_llm

    policy = tmp_path / "policy.yaml"
    policy.write_text("refusal: No.\nblocklist: [secret plan, forbidden]\npii: true\n")
    replies = ["Write to bob@example.com today.", "Here is the secret plan: none.", "Here is the secret plan."]
    llm = scripted_llm(tokenizer, replies)
    rails = Guardrails.load(policy)
    with TestClient(create_app(Server(llm, "tiny", rails=rails))) as http:
        def ask(content: str, **kw):
            return http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                           "max_tokens": 40, "temperature": 0, **kw})

        r = ask("tell me the forbidden thing").json()["choices"][0]
        assert r["finish_reason"] == "content_filter" and r["message"] == {"role": "assistant", "content": None,
                                                                           "refusal": "No."}
        r = ask("hello").json()["choices"][0]  # the first reply: its address redacted
        assert r["message"]["content"] == "Write to [EMAIL] today." and r["finish_reason"] == "stop"
        r = ask("hello").json()["choices"][0]  # the second: blocked whole
        assert r["finish_reason"] == "content_filter" and r["message"]["refusal"] == "No."
        with http.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "temperature": 0,
                "stream": True}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        shown = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert "secret" not in shown and "Here is the".startswith(shown.strip())  # text before it may go out
        assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
        assert any(c["choices"][0]["delta"].get("refusal") == "No." for c in chunks)
        r = http.post("/v1/completions", json={"prompt": "a forbidden prompt", "max_tokens": 3})
        assert r.json()["choices"][0]["finish_reason"] == "content_filter"


def test_a_server_with_an_index_retrieves_before_each_chat_answer(tokenizer, tmp_path):
    from fastapi.testclient import TestClient

    from gptlab.rag import Index
    from tests.test_agent import scripted_llm

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("The zorbular engine was built in 1901 by Ada.\n")
    (tmp_path / "docs" / "b.txt").write_text("Trains leave the station at noon.\n")
    index = Index.build([str(tmp_path / "docs")], tmp_path / "index", progress=False)
    llm = scripted_llm(tokenizer, ["It was built in 1901 [1].", "At noon [1]."])
    with TestClient(create_app(Server(llm, "tiny", index=index, index_k=2))) as http:
        question = [{"role": "user", "content": "When was the zorbular engine built?"}]
        body = http.post("/v1/chat/completions", json={"messages": question, "max_tokens": 30,
                                                       "temperature": 0}).json()
        assert body["choices"][0]["message"]["content"] == "It was built in 1901 [1]."
        assert [s["source"].endswith("a.txt") for s in body["sources"]] == [True]
        assert body["retrieved"][0]["passage"].startswith("The zorbular engine")
        alone = len(llm.tokenizer.encode_chat(question))
        assert body["usage"]["prompt_tokens"] > alone + 10  # the passages went into the prompt
        with http.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "trains?"}],
                                                               "max_tokens": 30, "stream": True}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert chunks[-1]["sources"][0]["source"].endswith("b.txt")
