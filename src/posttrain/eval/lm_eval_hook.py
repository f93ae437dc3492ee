"""Import hook that registers `posttrain` in lm-evaluation-harness's model registry.

Installed by `python -m posttrain.eval.harness install` as a one-line `.pth` file. It adds a
meta-path finder that does nothing until `lm_eval.models` is imported; then, right after that
module has registered lm-eval's own models, it adds the lazy target
"posttrain.eval.harness:PosttrainLM" under the name `posttrain`.

Why `lm_eval.models` and not `lm_eval.api.registry`: lm-eval 0.4's `get_model` imports
`lm_eval.models` (which registers every built-in model) only while the registry is empty. A
hook that registered `posttrain` as soon as the registry existed left it non-empty, so
`lm_eval --model hf` failed with "no model for this name found". Registering after
`lm_eval.models` leaves lm-eval's own start-up exactly as it is without the hook.

Nothing heavy is imported at start-up, and processes that never use lm-eval pay one cheap
finder lookup per import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

TARGET_MODULE = "lm_eval.models"  # runs after lm-eval registered its built-in models
MODEL = ("posttrain", "posttrain.eval.harness:PosttrainLM")


def register() -> None:
    """Add `posttrain` to lm-eval's model registry, lazily (nothing of posttrain is imported)."""
    reg = sys.modules["lm_eval.api.registry"].model_registry  # lm_eval.models imported it
    name, target = MODEL
    if name not in reg:
        reg.register(name, target=target)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Add the finder once; if lm-eval's models are already registered, register right away."""
    if TARGET_MODULE in sys.modules:
        register()
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


PTH_NAME = "posttrain-lm-eval.pth"
PTH_LINE = "import posttrain.eval.lm_eval_hook as _h; _h.install()\n"


def write_pth(site_dir=None) -> Path:
    """Write the one-line `.pth` file into `site_dir` (default: this environment's site-packages)."""
    import sysconfig

    p = Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME
    p.write_text(PTH_LINE)
    return p
