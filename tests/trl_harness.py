"""TRL's own DPO and ORPO losses and gradients on one batch, for tests that compare gptlab against them.

`trl_dpo` and `trl_orpo` build TRL's trainer (`trl.DPOTrainer`, `trl.experimental.orpo.ORPOTrainer`) on a Hugging
Face causal-LM folder and a handful of plain-text records `{"prompt", "chosen", "rejected"}`, take the first batch
from the trainer's own dataloader (batch size = number of records, sequential order), run the trainer's loss
(`compute_loss`) once, call `backward`, and collect every trainable parameter's gradient. The optimizer never steps.
Everything runs on CPU in float32, dropout off, no gradient checkpointing, nothing saved, nothing sent.

The returned batch (`input_ids`, `attention_mask`, `completion_mask`, all (2B, T), chosen rows first, then the
rejected rows in the same record order, right-padded with the tokenizer's pad id) is the one the policy model was
called with (captured with a forward pre-hook, and checked against the collated batch). What a row holds:

DPO (`trl/trainer/dpo_trainer.py`, `_prepare_dataset` and `DataCollatorForPreference`):
- the text `eos_token` is appended to `chosen` and `rejected` unless already there; the row is
  `tokenizer(prompt + chosen + eos_token)["input_ids"]` (no separator between prompt and completion; the tokenizer's
  own special tokens are added, so BOS is there exactly when the tokenizer's post-processor adds it);
- the prompt part is the common prefix of `tokenizer(prompt)` with both tokenized `prompt + chosen` and
  `prompt + rejected` (it is shorter than the tokenized prompt only when tokens merge across the boundary);
- `completion_mask` is 1 on the completion tokens, EOS included, 0 on BOS, prompt and padding.
ORPO (`trl/experimental/orpo/orpo_trainer.py`, `tokenize_row`, `build_tokenized_answer`):
- the row is `[bos_token_id] + tokenizer(prompt + answer, add_special_tokens=False) + [eos_token_id]` (BOS only if
  the tokenizer has one and it is not already first, EOS only if not already last); the prompt part is
  `tokenizer(prompt)`'s length, one less when its last token merges with the answer;
- `completion_mask` is `labels != -100`: 1 on the answer tokens, EOS included. For ordinary tokenizers (BOS from the
  post-processor, no merge across the boundary) the DPO and ORPO batches are identical.

Shift convention (both): `completion_mask` marks input positions; the log-prob of `input_ids[:, t]` comes from
`logits[:, t-1]`, so the counted terms are `log_softmax(logits[:, :-1]).gather(input_ids[:, 1:])` times
`completion_mask[:, 1:]` (position 0 is never scored).

Losses, with `lp_i` the log-prob of token i of a row and B the number of records:
- DPO: `s = sum_t lp_t * mask_t` per row (summed, not averaged); `h = (s_c - s_ref_c) - (s_r - s_ref_r)`;
  the reference is a separately loaded frozen copy of the same weights, or with LoRA the same model with the adapter
  disabled. sigmoid: `-logsigmoid(beta * h)`; robust (`label_smoothing` = e):
  `(-(1 - e) * logsigmoid(beta * h) + e * logsigmoid(-beta * h)) / (1 - 2e)`;
  ipo: each log-ratio divided by its row's completion length `completion_mask.sum(1)` (the unshifted mask, clamped
  to >= 1), then `(h_avg - 1 / (2 * beta)) ** 2`. The loss is the mean over the B pairs.
  Metrics: rewards/chosen = mean `beta * (s_c - s_ref_c)`, likewise rejected, margins their difference, accuracies
  the fraction chosen > rejected.
- ORPO (no reference): `l = sum_t lp_t * mask_t / sum_t mask_t` per row (per-token average over the completion,
  EOS included); `log_odds = (l_c - l_r) - (log1mexp(l_c) - log1mexp(l_r))` with `log1mexp(x) = log(1 - exp(x))`;
  `nll` = `CrossEntropyLoss` (mean) over the chosen rows only, with every real token (`attention_mask == 1`) a
  target, prompt tokens included (shifted: position 0, the BOS, is context only), averaged over all those tokens of
  the batch together (not per row); `loss = nll - beta * mean_pairs(logsigmoid(log_odds))`. Metrics:
  rewards/chosen = mean `beta * l_c`, likewise rejected; nll_loss = `nll`; log_odds_ratio = mean logsigmoid(log_odds).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["TRLResult", "trl_dpo", "trl_orpo"]


@dataclass
class TRLResult:
    """One TRL step: loss, gradients, and the exact batch (see the module docstring for what a row means)."""

    loss: float
    grads: dict[str, torch.Tensor]  # trainable parameter name (HF model, or the peft model's LoRA params) -> float32
    input_ids: torch.Tensor  # (2B, T) chosen rows first, then rejected rows
    completion_mask: torch.Tensor  # (2B, T) 1 on the tokens whose log-probs are counted
    attention_mask: torch.Tensor  # (2B, T)
    metrics: dict[str, float] = field(default_factory=dict)  # TRL's logged metrics for this step
    lora_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # the adapters used (peft names), or {}


def _load(model_dir: str | Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _tokenizer(tokenizer_dir: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # what DPOTrainer does too
    return tok


def _common_args(out: str, n: int, seed: int) -> dict:
    return dict(
        output_dir=out, report_to="none", per_device_train_batch_size=n, train_sampling_strategy="sequential",
        dataloader_num_workers=0, activation_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_dropout=True, seed=seed, data_seed=seed,
    )


def _lora_config(lora: dict):
    from peft import LoraConfig

    return LoraConfig(**{"task_type": "CAUSAL_LM", **lora})


def _set_lora(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Give every lora_B a seeded nonzero value (peft starts it at 0); return all LoRA weights by peft name."""
    gen = torch.Generator().manual_seed(seed + 1)
    weights = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" not in name:
                continue
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            weights[name] = p.detach().float().clone()
    return weights


@contextlib.contextmanager
def _capture_first_call(module: torch.nn.Module):
    """Record input_ids and attention_mask of the first forward call of `module`."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_mod, args, kwargs):
        if not seen:
            seen["input_ids"] = (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).detach().clone()
            seen["attention_mask"] = kwargs["attention_mask"].detach().clone()

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _step(trainer, inputs: dict) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward+backward of the trainer's loss; (loss, grads, what the policy model was fed)."""
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    with _capture_first_call(model) as fed:
        loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    return loss.item(), grads, fed


def _check_fed(fed: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    assert torch.equal(fed["input_ids"].cpu(), input_ids) and torch.equal(fed["attention_mask"].cpu(), attention_mask)


def trl_dpo(
    model_dir: str | Path,
    tokenizer_dir: str | Path,
    records: list[dict],
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    lora: dict | None = None,
    seed: int = 0,
) -> TRLResult:
    """TRL DPOTrainer's loss and gradients on all `records` as one batch (loss_type "sigmoid", "ipo", "robust").

    Without `lora` all parameters train against a frozen, separately loaded copy; with `lora` (peft LoraConfig
    kwargs) TRL's peft path is used (reference = adapter disabled) and lora_B is set to seeded random values first.
    """
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class _DPOTrainer(DPOTrainer):
        def _send_telemetry(self) -> None:  # no network
            pass

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            **_common_args(out, len(records), seed), beta=beta, loss_type=[loss_type], label_smoothing=label_smoothing,
            max_length=None, precompute_ref_log_probs=False, padding_free=False, remove_unused_columns=True,
        )
        trainer = _DPOTrainer(
            model=_load(model_dir), ref_model=None if lora else _load(model_dir).eval(), args=args,
            train_dataset=Dataset.from_list(records), processing_class=_tokenizer(tokenizer_dir),
            peft_config=_lora_config(lora) if lora else None,
        )
        lora_weights = _set_lora(trainer.model, seed) if lora else {}
        batch = next(iter(trainer.get_train_dataloader()))
        inputs = trainer._prepare_inputs(batch)
        loss, grads, fed = _step(trainer, inputs)
    ids, att, comp = (batch[k].cpu() for k in ("input_ids", "attention_mask", "completion_mask"))
    _check_fed(fed, ids, att)
    metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items() if v}
    return TRLResult(loss, grads, ids, comp, att, metrics, lora_weights)


def trl_orpo(
    model_dir: str | Path,
    tokenizer_dir: str | Path,
    records: list[dict],
    beta: float = 0.1,
    lora: dict | None = None,
    seed: int = 0,
) -> TRLResult:
    """TRL ORPOTrainer's loss and gradients on all `records` as one batch (NLL of chosen minus beta * log-odds term).

    With `lora` (peft LoraConfig kwargs) the model is wrapped by TRL and lora_B is set to seeded random values first.
    """
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    class _ORPOTrainer(ORPOTrainer):
        def _send_telemetry(self) -> None:  # no network
            pass

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as out:
        args = ORPOConfig(
            **_common_args(out, len(records), seed), beta=beta, max_length=1 << 20, remove_unused_columns=False,
        )
        trainer = _ORPOTrainer(
            model=_load(model_dir), args=args, train_dataset=Dataset.from_list(records),
            processing_class=_tokenizer(tokenizer_dir), peft_config=_lora_config(lora) if lora else None,
        )
        lora_weights = _set_lora(trainer.model, seed) if lora else {}
        batch = next(iter(trainer.get_train_dataloader()))
        inputs = trainer._prepare_inputs(batch)
        loss, grads, fed = _step(trainer, inputs)
    cat = ORPOTrainer.concatenated_inputs(inputs, padding_value=trainer.padding_value)
    ids, att = cat["concatenated_input_ids"].cpu(), cat["concatenated_attention_mask"].cpu()
    comp = (cat["concatenated_labels"] != -100).long().cpu()
    _check_fed(fed, ids, att)
    metrics = {k: float(v[-1]) for k, v in trainer._stored_metrics["train"].items() if v}
    return TRLResult(loss, grads, ids, comp, att, metrics, lora_weights)


# ----------------------------------------------------------------------------------------------------------------
# Self-check: python tests/trl_harness.py


def _tiny_tokenizer(path: Path, texts: list[str]) -> None:
    """A byte-level BPE (vocab 300) with <pad>, <s> (added as BOS by the post-processor) and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))],
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(
        path
    )


def _tiny_llama(path: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, initializer_range=0.2,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)


def _seq_logps(model, r: TRLResult, average: bool = False) -> torch.Tensor:
    logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, r.input_ids[:, 1:, None])[..., 0]
    mask = r.completion_mask[:, 1:].float()
    s = (lp * mask).sum(1)
    return s / mask.sum(1) if average else s


def _policy(model_dir: Path, r: TRLResult, lora: dict | None):
    model = _load(model_dir)
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(lora))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, w in r.lora_weights.items():
                params[name].copy_(w)
    return model.train()


def _compare(r: TRLResult, loss: torch.Tensor, model, what: str) -> None:
    import math

    assert math.isclose(loss.item(), r.loss, abs_tol=1e-5), (what, loss.item(), r.loss)
    loss.backward()
    mine = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert mine.keys() == r.grads.keys(), what
    for n, g in mine.items():
        err, scale = (g - r.grads[n]).abs().max().item(), r.grads[n].abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, (what, n, err, scale)


def _hand_dpo(model_dir: Path, r: TRLResult, beta: float, loss_type: str, eps: float, lora: dict | None) -> None:
    import torch.nn.functional as F

    policy = _policy(model_dir, r, lora)
    s = _seq_logps(policy, r)
    with torch.no_grad():
        if lora:
            with policy.disable_adapter():
                ref = _seq_logps(policy, r)
        else:
            ref = _seq_logps(_load(model_dir), r)
    ratio = s - ref
    if loss_type == "ipo":
        ratio = ratio / r.completion_mask.sum(1).clamp(min=1)
    c, rj = ratio.chunk(2)
    h = c - rj
    if loss_type == "sigmoid":
        per = -F.logsigmoid(beta * h)
    elif loss_type == "robust":
        per = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    else:
        per = (h - 1 / (2 * beta)) ** 2
    _compare(r, per.mean(), policy, f"dpo {loss_type} lora={bool(lora)}")
    if loss_type != "ipo":
        rc, rr = (beta * (s - ref)).detach().chunk(2)
        assert abs(r.metrics["rewards/chosen"] - rc.mean().item()) < 1e-5
        assert abs(r.metrics["rewards/margins"] - (rc - rr).mean().item()) < 1e-5


def _hand_orpo(model_dir: Path, r: TRLResult, beta: float, lora: dict | None) -> None:
    import torch.nn.functional as F

    policy = _policy(model_dir, r, lora)
    logits = policy(input_ids=r.input_ids, attention_mask=r.attention_mask).logits.float()
    b = r.input_ids.shape[0] // 2
    targets = r.input_ids.masked_fill(r.attention_mask == 0, -100)[:b, 1:]
    nll = F.cross_entropy(logits[:b, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, r.input_ids[:, 1:, None])[..., 0]
    mask = r.completion_mask[:, 1:].float()
    lc, lr = ((lp * mask).sum(1) / mask.sum(1)).chunk(2)
    log_odds = (lc - lr) - (torch.log(-torch.expm1(lc)) - torch.log(-torch.expm1(lr)))
    loss = nll - beta * F.logsigmoid(log_odds).mean()
    _compare(r, loss, policy, f"orpo lora={bool(lora)}")
    assert abs(r.metrics["nll_loss"] - nll.item()) < 1e-5
    assert abs(r.metrics["rewards/chosen"] - beta * lc.mean().item()) < 1e-5


def _self_check() -> None:
    import time

    records = [
        {"prompt": "Question: what is two plus two?\nAnswer:", "chosen": " four.", "rejected": " five, I think."},
        {"prompt": "Name a colour.", "chosen": " Blue", "rejected": " A train"},
        {"prompt": "Say hello:", "chosen": " hello there, friend", "rejected": " bye"},
    ]
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir, model_dir = Path(tmp) / "tok", Path(tmp) / "model"
        _tiny_tokenizer(tok_dir, [r[k] for r in records for k in ("prompt", "chosen", "rejected")] * 5)
        _tiny_llama(model_dir, tok_dir)
        tok = _tokenizer(tok_dir)
        print(f"bos={tok.bos_token_id} eos={tok.eos_token_id} pad={tok.pad_token_id} vocab={len(tok)}")
        runs = [("dpo", t, e, lo) for t, e in (("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.1)) for lo in (None, lora)]
        runs += [("orpo", None, 0.0, lo) for lo in (None, lora)]
        batches = {}
        for kind, loss_type, eps, lo in runs:
            t0 = time.perf_counter()
            if kind == "dpo":
                r = trl_dpo(model_dir, tok_dir, records, beta=0.1, loss_type=loss_type, label_smoothing=eps, lora=lo)
            else:
                r = trl_orpo(model_dir, tok_dir, records, beta=0.1, lora=lo)
            dt = time.perf_counter() - t0
            print(
                f"{kind:4} {loss_type or '':7} lora={lo is not None!s:5} loss={r.loss:.6f} grads={len(r.grads)} "
                f"input_ids={tuple(r.input_ids.shape)} completion={r.completion_mask.sum(1).tolist()} "
                f"lora_weights={len(r.lora_weights)} {dt:.2f}s"
            )
            assert all(g.abs().sum() > 0 for g in r.grads.values()), "a zero gradient"
            # BOS first, EOS last real token, completions end with EOS
            lengths = r.attention_mask.sum(1)
            assert (r.input_ids[:, 0] == tok.bos_token_id).all()
            assert (r.input_ids[torch.arange(len(lengths)), lengths - 1] == tok.eos_token_id).all()
            assert (r.completion_mask <= r.attention_mask).all()
            if kind == "dpo":
                _hand_dpo(model_dir, r, 0.1, loss_type, eps, lo)
            else:
                _hand_orpo(model_dir, r, 0.1, lo)
            batches[kind] = r
        d, o = batches["dpo"], batches["orpo"]
        same = torch.equal(d.input_ids, o.input_ids) and torch.equal(d.completion_mask, o.completion_mask)
        print(f"DPO and ORPO batches identical: {same}")
        assert same
        print(tok.convert_ids_to_tokens(d.input_ids[0][d.attention_mask[0].bool()].tolist()))
        print("completion_mask row 0:", d.completion_mask[0].tolist())
    print("trl_harness self-check passed")


if __name__ == "__main__":
    _self_check()
