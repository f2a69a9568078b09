"""The vision path: image loading, HF-equal preprocessing (separable resize with PIL's filters), position-embedding
resampling, and the vision encoders (towers + connectors) of LLaVA, Idefics3/SmolVLM and Idefics2."""
import importlib

from lanner.vision.pos_embed import interpolate_pos_embed
from lanner.vision.resize import LAYOUTS, resize
from lanner.vision.taps import ALIGNS, MODES, Taps, axis_taps, sample_positions

# name -> module, imported at first use: every command (`lanner resize` too) starts without PIL (27 ms)
_WITH_PIL = {"load_image": "images", "image_digest": "images", "ProcessedImage": "processors",
             "load_image_processor": "processors"}
__all__ = ["resize", "interpolate_pos_embed", "axis_taps", "sample_positions", "Taps", "MODES", "ALIGNS", "LAYOUTS",
           *_WITH_PIL]


def __getattr__(name: str):
    if name not in _WITH_PIL:
        raise AttributeError(f"module 'lanner.vision' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lanner.vision.{_WITH_PIL[name]}"), name)
