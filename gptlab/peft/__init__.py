"""Training methods: full training and parameter-efficient fine-tuning, each attached to an unchanged base model."""

from gptlab.peft.adapter import Adapter, AdapterLinear
from gptlab.peft.base import Method
from gptlab.peft.llama_adapter import LlamaAdapter
from gptlab.peft.lora import LoRA, LoRALinear, QLoRA
from gptlab.peft.preference import DPO, ORPO
from gptlab.peft.qat import QAT
from gptlab.peft.virtual import PrefixTuning, PromptTuning

METHODS = {"full": Method, "lora": LoRA, "qlora": QLoRA, "prefix": PrefixTuning, "prompt": PromptTuning,
           "adapter": Adapter, "llama-adapter": LlamaAdapter, "dpo": DPO, "orpo": ORPO, "qat": QAT}

__all__ = ["DPO", "METHODS", "ORPO", "Adapter", "AdapterLinear", "LlamaAdapter", "LoRA", "LoRALinear", "Method",
           "PrefixTuning", "PromptTuning", "QAT", "QLoRA"]
