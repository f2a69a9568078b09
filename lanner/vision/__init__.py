"""The vision path: image loading, HF-equal preprocessing (separable resize with PIL's filters), position-embedding
resampling, and the vision encoders (towers + connectors) of LLaVA, Idefics3/SmolVLM and Idefics2."""
from lanner.vision.images import image_digest, load_image
from lanner.vision.pos_embed import interpolate_pos_embed
from lanner.vision.processors import ProcessedImage, load_image_processor
from lanner.vision.resize import LAYOUTS, resize
from lanner.vision.taps import ALIGNS, MODES, Taps, axis_taps, sample_positions

__all__ = ["resize", "interpolate_pos_embed", "axis_taps", "sample_positions", "Taps", "MODES", "ALIGNS", "LAYOUTS",
           "load_image", "image_digest", "load_image_processor", "ProcessedImage"]
