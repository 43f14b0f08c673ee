"""detjax.models: reference models built on detjax.nn."""

from detjax.models.gemma import GemmaConfig, Transformer

__all__ = ["GemmaConfig", "Transformer"]
