"""Everything is in pyproject.toml; this adds one file to the wheel: `gptlab-harness.pth`, at the top of
site-packages, which lets the bare `lm_eval` command find gptlab's model (see gptlab_harness_hook.py)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "gptlab-harness.pth"


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildWithPth})
