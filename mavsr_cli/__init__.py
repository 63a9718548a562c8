"""mavsr: adaptive audio-visual speech recognition with Matryoshka multimodal LLMs."""

from . import compat as _compat  # noqa: F401  (guards torchaudio before transformers is imported)

__version__ = "0.1.0"
