"""gptlab as a model of EleutherAI's lm-evaluation-harness.

    lm_eval --model gptlab --model_args checkpoint=out/run --tasks hellaswag [any lm_eval flag]

works once gptlab is installed: lm_eval discovers models only inside its own package, so gptlab installs a start-up
hook (`gptlab-harness.pth`, `gptlab_harness_hook.py`) that registers this model lazily when lm_eval loads its models.
`python -m gptlab.harness ...` is the same command with the model registered directly; from Python,
`import gptlab.harness` and then `lm_eval.simple_evaluate(model="gptlab", model_args={"checkpoint": ...}, ...)`.

The three request types follow the harness's Hugging Face model (`hf`) step for step: a context's trailing spaces
move to the continuation, an empty context is the end-of-text token, windows keep the last `max_length` tokens, and
rolling log-likelihoods use the harness's own disjoint windows; so both give the same scores for the same weights
(the tests compare them on an exported copy).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # run as `python -m`: let the model class belong to `gptlab.harness`, where lm_eval looks
    from gptlab.harness import main

    sys.exit(main())
from typing import Any

import lm_eval.models  # noqa: F401  (registers the harness's own models first)
import torch
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from gptlab.api import load
from gptlab.generate import SamplingParams


@register_model("gptlab")
class GptlabLM(TemplateLM):
    """`--model_args checkpoint=DIR[,device=cpu|cuda][,dtype=float32|bfloat16][,max_gen_toks=256]`."""

    def __init__(self, checkpoint: str, device: str | None = None, dtype: str | None = None,
                 max_gen_toks: int = 256, batch_size: int | str = 1, **_: Any) -> None:
        super().__init__()
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            print(f"gptlab: no CUDA GPU for device {device!r}; running on the CPU", file=sys.stderr)
            device = "cpu"  # the harness's command line asks for cuda unless told otherwise
        self.llm = load(checkpoint, device=device, dtype=dtype)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = self.llm.model.config.block_size

    @property
    def eot_token_id(self) -> int:
        eos = self.llm.tokenizer.eos_id
        return 0 if eos is None else eos

    @property
    def prefix_token_id(self) -> int:
        """What an empty context starts from: the BOS where the model has one, else its EOS (the `hf` model's)."""
        bos = self.llm.tokenizer.bos_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """As the `hf` model encodes: the tokenizer's own BOS rule, unless told otherwise or the text already
        starts with the BOS."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.llm.tokenizer.decode([self.prefix_token_id]))
        return self.llm.tokenizer.encode(string, special=add_special_tokens)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.llm.tokenizer.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation after its context, and whether greedy decoding gives it."""
        device = self.llm.engine.device
        results = []
        for _, context_enc, continuation_enc in tqdm(requests, disable=disable_tqdm, desc="loglikelihood"):
            tokens = (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]
            n = len(continuation_enc)
            logits = self.llm.model(torch.tensor([tokens], device=device))[0, -n:]  # (n, vocab)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            target = torch.tensor(continuation_enc, device=device)
            greedy = bool((logprobs.argmax(-1) == target).all())
            results.append((float(logprobs.gather(1, target[:, None]).sum()), greedy))
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity tasks), in the harness's disjoint windows of the context."""
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="loglikelihood_rolling"):
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))
            scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            out.append(sum(ll for ll, _ in scored))
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a task asks) continuations, cut at the first stop string."""
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="generate_until"):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos = self.llm.tokenizer.decode([self.eot_token_id])
            if eos not in until:
                until.append(eos)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            ids = self.tok_encode(context)[-(self.max_length - max_new):] if max_new < self.max_length else []
            params = SamplingParams(temperature=temperature, top_p=kwargs.pop("top_p", None),
                                    seed=kwargs.pop("seed", None))
            rows = self.llm.engine.complete([ids or [self.prefix_token_id]], max_new, params, until)
            out.append(rows[0].text)
        return out


def main(argv: list[str] | None = None) -> int:
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0
