"""Server throughput under continuous batching: requests/s, tokens/s and time to first token (median, p90) at
1, 8, 16, 32 and 64 concurrent streaming clients, with the official `openai` client against `gptlab serve`'s app
on 127.0.0.1 (CPU). Each level runs at least twice as many requests as clients, each client sending its next one as
soon as the last ends.

The server is `gptlab serve` in its own process, as it is deployed, on a checkpoint saved here; `--in-process` runs
its app in a thread of this process instead, where the clients' threads share the server's interpreter lock (and,
on 2 cores, its CPU time: client parsing is not free either way).

    python benchmarks/serve.py [--clients 1,8,16,32,64] [--requests 64] [--max-tokens 32] [--max-concurrency 32]
                               [--in-process]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from gptlab.api import LLM
from gptlab.checkpoint import save_checkpoint
from gptlab.config import ModelConfig
from gptlab.data.sources import documents, stdlib_files
from gptlab.inference import prepare_for_inference
from gptlab.model import GPT
from gptlab.serve import Server, create_app
from gptlab.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,16,32,64")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level (at least 2 per "
                                                                 "client)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-concurrency", type=int, default=32, help="the server's cache slots (rows decoded "
                                                                        "together)")
    parser.add_argument("--in-process", action="store_true", help="the server's app in a thread of this process")
    args = parser.parse_args()

    import openai
    import uvicorn

    texts = ["".join(d.read()) for d in documents([("text", p) for p in stdlib_files()[:40]])]
    tok = Tokenizer.train_bpe(texts, vocab_size=2048)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=tok.vocab_size)
    model = GPT(cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.TemporaryDirectory()
    if args.in_process:
        llm = LLM(prepare_for_inference(model), tok)
        server = uvicorn.Server(uvicorn.Config(create_app(Server(llm, "bench", args.max_concurrency)),
                                               host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        stop = lambda: setattr(server, "should_exit", True)  # noqa: E731
    else:
        save_checkpoint(f"{tmp.name}/bench", model, tok)
        proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", f"{tmp.name}/bench", "--port", str(port),
                                 "--max-concurrency", str(args.max_concurrency)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    sys.exit("gptlab serve exited before it answered")
                time.sleep(0.1)
        else:
            proc.terminate()
            sys.exit("gptlab serve did not answer within a minute")
        stop = proc.terminate
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

        served = client.models.list().data[0].id

        def one(i: int) -> tuple[float, int]:
            """(time to first token, tokens generated) of one streamed request."""
            t0 = time.perf_counter()
            first, tokens = None, 0
            stream = client.completions.create(model=served, prompt=f"def function_{i}(", max_tokens=args.max_tokens,
                                               temperature=0.8, seed=i, stream=True,
                                               stream_options={"include_usage": True})
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return first if first is not None else time.perf_counter() - t0, tokens

        one(0)  # warm-up
        print(f"# model: {cfg.n_layer} layers x {cfg.n_embd}, prepacked weights; server "
              f"{'in this process' if args.in_process else 'gptlab serve, its own process'}; "
              f"{args.max_tokens} new tokens per request; server slots {args.max_concurrency}; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print("| concurrent clients | requests/s | x 1 client | tokens/s | TTFT median (s) | TTFT p90 (s) |")
        print("|---:|---:|---:|---:|---:|---:|")
        single = None
        for n in map(int, args.clients.split(",")):
            requests = max(args.requests, 2 * n)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                results = list(pool.map(one, range(requests)))
            wall = time.perf_counter() - t0
            ttft = sorted(r[0] for r in results)
            p90 = ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]
            rate = requests / wall
            single = single or rate
            print(f"| {n} | {rate:.2f} | {rate / single:.2f}x | {sum(r[1] for r in results) / wall:.1f} | "
                  f"{statistics.median(ttft):.3f} | {p90:.3f} |", flush=True)
    finally:
        stop()
        tmp.cleanup()


if __name__ == "__main__":
    main()
