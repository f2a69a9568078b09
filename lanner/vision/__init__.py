"""Image preprocessing for the vision path: separable resize and ViT position-embedding resampling."""
from lanner.vision.pos_embed import interpolate_pos_embed
from lanner.vision.resize import LAYOUTS, resize
from lanner.vision.taps import ALIGNS, MODES, Taps, axis_taps, sample_positions

__all__ = ["resize", "interpolate_pos_embed", "axis_taps", "sample_positions", "Taps", "MODES", "ALIGNS", "LAYOUTS"]
