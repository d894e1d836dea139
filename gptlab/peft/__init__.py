"""Training methods: full training and parameter-efficient fine-tuning, each attached to an unchanged base model."""

from gptlab.peft.base import Method
from gptlab.peft.lora import LoRA, LoRALinear

METHODS = {"full": Method, "lora": LoRA}

__all__ = ["METHODS", "LoRA", "LoRALinear", "Method"]
