"""Lets the bare `lm_eval` command find gptlab's model: `lm_eval --model gptlab --model_args checkpoint=DIR ...`.

lm-evaluation-harness discovers models only inside its own package, so gptlab installs `gptlab-harness.pth`, whose
one line imports this module at interpreter start-up. It imports nothing itself: it waits for `lm_eval.models` to be
imported and then registers `gptlab` as a lazy entry ("gptlab.harness:GptlabLM"), so PyTorch and gptlab load only
when a harness run asks for the model. Any failure here is swallowed: a start-up hook must never break Python.
"""

from __future__ import annotations

import sys

MODULE, TARGET = "lm_eval.models", "gptlab.harness:GptlabLM"


class _Loader:
    """Runs the real loader of `lm_eval.models`, then adds the lazy `gptlab` entry to its model registry."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        try:
            from lm_eval.api.registry import model_registry

            if "gptlab" not in model_registry:
                model_registry.register("gptlab", target=TARGET)
        except Exception:  # an lm_eval without this registry: `python -m gptlab.harness` still works
            pass


class _Finder:
    """A meta-path finder that answers only for `lm_eval.models`, once, and otherwise steps aside."""

    done = False

    def find_spec(self, name, path, target=None):
        if name != MODULE or self.done:
            return None
        self.done = True  # (the import system is iterating sys.meta_path: it is left as it is)
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


try:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
except Exception:
    pass
