"""`gptlab download` against a hub of our own on 127.0.0.1 (the same HTTP API the real one speaks), and offline."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import load_checkpoint

from .conftest import make_hf_gpt2

SHA = "0123456789abcdef0123456789abcdef01234567"
TEMPLATE = "{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}### " \
           "assistant:{% endif %}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tokenizer):
    """A local server with one repository, me/tiny-gpt2, made from a random GPT-2 built here."""
    folder = tmp_path_factory.mktemp("repo")
    model = make_hf_gpt2(folder, tokenizer, n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=320)
    (folder / "chat_template.jinja").write_text(TEMPLATE)  # as transformers saves a chat model's template
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, body: bytes | None, head: bool, headers: dict | None = None) -> None:
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def answer(self, head: bool) -> None:
            path = self.path.split("?")[0]
            requests.append(path)
            if path.startswith("/api/models/me/tiny-gpt2/tree/"):
                tree = [{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for n, b in files.items()]
                return self.reply(json.dumps(tree).encode(), head, {"Content-Type": "application/json"})
            if path.startswith("/api/models/me/tiny-gpt2/revision/"):
                info = {"id": "me/tiny-gpt2", "sha": SHA, "siblings": [{"rfilename": n} for n in files]}
                return self.reply(json.dumps(info).encode(), head, {"Content-Type": "application/json"})
            prefix = f"/me/tiny-gpt2/resolve/{SHA}/"
            body = files.get(path[len(prefix):]) if path.startswith(prefix) else None
            etag = hashlib.sha1(body).hexdigest() if body is not None else ""
            self.reply(body, head, {"X-Repo-Commit": SHA, "ETag": f'"{etag}"'})

        def do_GET(self):
            self.answer(head=False)

        def do_HEAD(self):
            self.answer(head=True)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", model, requests
    server.shutdown()


def gptlab(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptlab", *args], capture_output=True, text=True,
                          env={**os.environ, **env})


def test_download_and_import_from_a_hub(hub, tmp_path):
    url, model, requests = hub
    env = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = gptlab("download", "me/tiny-gpt2", "--out", str(tmp_path / "ckpt"), env=env)
    assert done.returncode == 0, done.stderr
    assert any(r.startswith("/me/tiny-gpt2/resolve/") for r in requests)  # it really came over HTTP
    ours, tok = load_checkpoint(tmp_path / "ckpt")
    assert tok.chat_template == TEMPLATE and (tmp_path / "ckpt" / "chat_template.jinja").read_text() == TEMPLATE
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["source"] == "me/tiny-gpt2"
    idx = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), model(idx).logits, atol=1e-5, rtol=1e-5)
    # offline, the cached copy is used; a model never downloaded is a one-line error
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    again = gptlab("download", "me/tiny-gpt2", env=offline)
    assert again.returncode == 0 and str(Path(env["HF_HOME"])) in again.stdout, again.stderr
    missing = gptlab("download", "me/never-seen", env=offline)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().startswith("gptlab: error: cannot download me/never-seen: offline")


def test_unreachable_hub_is_one_line(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = gptlab("download", "me/nothing", env={"HF_ENDPOINT": f"http://127.0.0.1:{port}",
                                                 "HF_HOME": str(tmp_path / "home")})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "cannot download me/nothing" in done.stderr
