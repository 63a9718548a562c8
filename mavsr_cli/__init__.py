"""mavsr: adaptive audio-visual speech recognition with Matryoshka multimodal LLMs."""

from __future__ import annotations

import importlib.abc
import sys

__version__ = "0.1.0"


class _TorchaudioGuard(importlib.abc.MetaPathFinder):
    """Runs compat.py's torchaudio probe just before the first import of transformers or torchaudio
    (whoever imports them), not at `import mavsr_cli`: torch stays unloaded until a command needs it,
    so `mavsr --help` is quick. A torchaudio that the probe found broken then imports as "not installed"."""

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in ("transformers", "torchaudio", "peft"):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
                from . import compat  # noqa: F401  (probes torchaudio once; blocks it when broken)
            if top == "torchaudio" and sys.modules.get("torchaudio", 0) is None:
                raise ModuleNotFoundError(f"No module named {name!r} (unusable here; see `mavsr info`)", name=name)
        return None


if not any(isinstance(f, _TorchaudioGuard) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchaudioGuard())
