"""The engine: cached decoding equals uncached, batches equal single prompts, sampling equals Hugging Face's."""

from __future__ import annotations

import pytest
import torch

from gptlab.api import LLM
from gptlab.checkpoint import load_checkpoint
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.generate import Engine, SamplingParams, TextStream, process_logits
from gptlab.model import GPT

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=97)).eval()


def uncached_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Reference decoding: the whole sequence through the model at every step, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_cached_decoding_equals_uncached(model):
    prompt = [5, 17, 3, 88, 42]
    got = [int(t) for t in Engine(model).generate_ids([prompt], 40, GREEDY)]
    assert got == uncached_greedy(model, prompt, 40)


def test_batch_of_different_lengths_equals_each_alone(model):
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2], [60]]
    steps = [t.tolist() for t in Engine(model).generate_ids(prompts, 20, GREEDY)]
    for b, p in enumerate(prompts):
        assert [s[b] for s in steps] == uncached_greedy(model, p, 20)


def test_batch_matches_transformers_left_padded(hf_pair):
    hf, ckpt = hf_pair
    model, _ = load_checkpoint(ckpt)
    prompts = [[11, 12, 13, 14, 15, 16], [200, 201], [7, 8, 9, 10]]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=25, min_new_tokens=25, do_sample=False,
                       pad_token_id=0)[:, T:]
    got = torch.stack(list(Engine(model).generate_ids(prompts, 25, GREEDY)), dim=1)
    assert got.tolist() == want.tolist()


def test_repetition_penalty_matches_transformers(hf_pair):
    hf, ckpt = hf_pair
    model, _ = load_checkpoint(ckpt)
    prompt = [3, 4, 5, 3, 4, 5]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=30, min_new_tokens=30, do_sample=False,
                       repetition_penalty=1.5)[0, 6:].tolist()
    got = [int(t) for t in Engine(model).generate_ids([prompt], 30, SamplingParams(0, repetition_penalty=1.5))]
    assert got == want


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.5, repetition_penalty=1.2),
])
def test_logit_processing_matches_transformers(params):
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50, generator=g) * 3
    history = torch.randint(0, 50, (4, 12), generator=g)
    ref = logits.clone()
    if params.repetition_penalty != 1.0:
        ref = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(history, ref)
    ref = TemperatureLogitsWarper(params.temperature)(history, ref)
    if params.top_k:
        ref = TopKLogitsWarper(params.top_k)(history, ref)
    if params.top_p:
        ref = TopPLogitsWarper(params.top_p)(history, ref)
    torch.testing.assert_close(process_logits(logits, params, history), ref)


def test_seeded_sampling_is_reproducible(model):
    params = SamplingParams(temperature=1.0, top_k=30, seed=1234)
    a = [t.tolist() for t in Engine(model).generate_ids([[1, 2]], 30, params)]
    b = [t.tolist() for t in Engine(model).generate_ids([[1, 2]], 30, params)]
    c = [t.tolist() for t in Engine(model).generate_ids([[1, 2]], 30, SamplingParams(1.0, 30, seed=99))]
    assert a == b and a != c


def test_top_k_one_is_greedy(model):
    top1 = [int(t) for t in Engine(model).generate_ids([[4, 5]], 20, SamplingParams(1.0, top_k=1, seed=0))]
    assert top1 == uncached_greedy(model, [4, 5], 20)


def test_generation_slides_past_the_context(model):
    """Up to the context, plain cached decoding; then the last half of the context is the new prompt."""
    prompt = list(range(50))
    got = [int(t) for t in Engine(model).generate_ids([prompt], 40, GREEDY)]
    assert len(got) == 40
    first = uncached_greedy(model, prompt, 14)  # 50 + 14 = 64 fills the context
    assert got[:14] == first
    window = (prompt + first)[-32:]
    assert got[14:40] == uncached_greedy(model, window, 26)
    with pytest.raises(GptlabError, match="context is 64 tokens"):
        list(Engine(model).generate_ids([list(range(64))], 5, GREEDY))


def test_bad_sampling_values():
    for bad in (dict(top_p=1.5), dict(top_p=0.0), dict(temperature=-1), dict(top_k=0), dict(repetition_penalty=0)):
        with pytest.raises(GptlabError):
            SamplingParams(**bad)


# -- text ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=tokenizer.vocab_size)
    return LLM(GPT(cfg).eval(), tokenizer)


def test_stream_pieces_join_to_the_completion(llm):
    (done,) = llm.complete("The train", max_new_tokens=40, temperature=1.0, seed=5)
    pieces = list(llm.stream("The train", max_new_tokens=40, temperature=1.0, seed=5))
    assert "".join(pieces) == done.text
    assert len(pieces) > 1
    assert llm.tokenizer.decode(done.token_ids) == done.text or done.finish_reason == "stop"


def test_stop_strings_cut_the_text(llm):
    (full,) = llm.complete("The", max_new_tokens=60, temperature=0)
    stop = full.text[10:13]
    (cut,) = llm.complete("The", max_new_tokens=60, temperature=0, stop=[stop])
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    assert "".join(llm.stream("The", max_new_tokens=60, temperature=0, stop=[stop])) == cut.text


def test_text_stream_holds_back_partial_characters_and_stop_prefixes(tokenizer):
    ids = tokenizer.encode("ab 🙂 cd STOP ef")
    stream = TextStream(tokenizer, stop=["STOP"], stop_ids=tokenizer.eos_id)
    out = []
    for t in ids:
        out.append(stream.push(t))
        assert "\ufffd" not in out[-1]
        if stream.done:
            break
    assert "".join(out) + stream.finish() == "ab 🙂 cd "
    assert stream.finish_reason == "stop"


def test_eos_ends_a_row(tokenizer):
    eos = tokenizer.eos_id
    stream = TextStream(tokenizer, stop_ids=eos)
    text = "".join(stream.push(t) for t in tokenizer.encode("hello") + [eos])
    assert text == "hello" and stream.done and stream.token_ids[-1] == eos


def test_batch_text_generation(llm):
    prompts = ["The train left", "def", "Le train a quitté la gare"]
    batch = llm.generate(prompts, max_new_tokens=15, temperature=0)
    assert batch == [llm.generate(p, max_new_tokens=15, temperature=0) for p in prompts]


def test_empty_prompt_starts_from_end_of_text(llm):
    assert isinstance(llm.generate("", max_new_tokens=5, temperature=0), str)


def test_a_long_run_of_invalid_utf8_streams_in_bounded_steps(tokenizer):
    """A model writing bytes that never form a character (byte-level BPE pieces of lone continuation bytes) gets the
    text one decode of all its tokens gives, while the stream holds at most a few tokens back: each token costs the
    same however long the run (it once decoded the whole run again at every token)."""
    import random

    bad = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == "\ufffd"]
    good = tokenizer.encode(" the train left the station 🙂 é")
    rng = random.Random(0)
    ids = [rng.choice(bad) for _ in range(300)] + good + [rng.choice(bad) for _ in range(300)] + good
    stream = TextStream(tokenizer, stop=["NEVER"])
    stream.begin([])
    pieces, held = [], 0
    for token in ids:
        pieces.append(stream.push(token))
        held = max(held, len(stream._window) - stream._read)
    pieces.append(stream.finish())
    assert "".join(pieces) == tokenizer.decode(ids)
    assert held <= TextStream.PENDING + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prepacked_layers_compute_what_linear_does(model, dtype):
    """prepare_for_inference's oneDNN-prepacked Linear layers give the plain model's logits up to rounding, for one
    row and many, and the same greedy tokens."""
    import copy

    from gptlab.inference import PackedLinear, packing_available, prepare_for_inference

    if not packing_available(model.transformer.wte.weight.to(dtype)):
        pytest.skip("oneDNN cannot pack this dtype on this CPU")
    plain = copy.deepcopy(model).to(dtype)
    prepared = prepare_for_inference(copy.deepcopy(model).to(dtype))
    assert sum(isinstance(m, PackedLinear) for m in prepared.modules()) == 4 * model.config.n_layer + 1
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        for idx in (torch.tensor([[7]]), torch.randint(0, 97, (3, 9))):
            torch.testing.assert_close(prepared(idx).float(), plain(idx).float(), atol=tol, rtol=0)
    if dtype == torch.float32:
        prompt = [5, 17, 3, 88, 42]
        assert [int(t) for t in Engine(prepared).generate_ids([prompt], 20, GREEDY)] == \
            uncached_greedy(model, prompt, 20)
