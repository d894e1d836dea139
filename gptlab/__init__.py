"""gptlab: the whole life of a decoder-only GPT language model, in readable PyTorch."""

__version__ = "0.1.0"

from gptlab.api import LLM, load  # noqa: E402
from gptlab.config import PRESETS, ModelConfig  # noqa: E402
from gptlab.errors import GptlabError  # noqa: E402
from gptlab.finetuning import finetune  # noqa: E402
from gptlab.generate import Engine, SamplingParams  # noqa: E402
from gptlab.model import GPT  # noqa: E402
from gptlab.tokenizer import Tokenizer  # noqa: E402

__all__ = ["GPT", "LLM", "PRESETS", "Engine", "GptlabError", "ModelConfig", "SamplingParams", "Tokenizer",
           "__version__", "finetune", "load"]
