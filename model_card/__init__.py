"""The model card of a trained fashion tagger: a template and the code that fills it, offline."""

from .build import build_model_card

__all__ = ["build_model_card"]
