"""Training methods: full training and parameter-efficient fine-tuning, each attached to an unchanged base model."""

from gptlab.peft.adapter import Adapter, AdapterLinear
from gptlab.peft.base import Method
from gptlab.peft.lora import LoRA, LoRALinear

METHODS = {"full": Method, "lora": LoRA, "adapter": Adapter}

__all__ = ["METHODS", "Adapter", "AdapterLinear", "LoRA", "LoRALinear", "Method"]
