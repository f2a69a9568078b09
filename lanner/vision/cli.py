"""`lanner resize IN OUT (--scale S | --size WxH)`: resize an image file with lanner.vision.resize."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from lanner.vision.resize import resize
from lanner.vision.taps import ALIGNS, MODES

# Pillow modes whose pixels np.asarray / Image.fromarray round-trip; others are converted first.
_ARRAY_MODES = ("L", "LA", "RGB", "RGBA", "I", "I;16", "F")


def add_parser(subparsers):
    """Register the `resize` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser("resize", help="resize an image file", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_arguments(parser):
    parser.add_argument("input", help="image file to read")
    parser.add_argument("output", help="image file to write (format from the extension)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--scale", type=_parse_scale, help="factor, or SXxSY for width and height (e.g. 2 or 1.5x2)")
    target.add_argument("--size", type=_parse_size, help="output size as WIDTHxHEIGHT (e.g. 640x480)")
    parser.add_argument("--mode", choices=MODES, default="bilinear")
    parser.add_argument("--align", choices=ALIGNS, default="half_pixel")
    parser.add_argument("--antialias", action="store_true", help="widen the filter when downscaling (as PIL does)")


def run(args) -> int:
    from PIL import Image

    try:
        with Image.open(args.input) as image:
            pixels = np.asarray(_array_mode(image))
        out = resize(pixels, size=args.size, scale=args.scale, mode=args.mode, align=args.align,
                     antialias=args.antialias, layout="HW" if pixels.ndim == 2 else "HWC")
        Image.fromarray(np.ascontiguousarray(out)).save(args.output)
    except (OSError, ValueError) as error:
        print(f"lanner resize: error: {error}", file=sys.stderr)
        return 1
    (h, w), (out_h, out_w) = pixels.shape[:2], out.shape[:2]
    print(f"{args.input} {w}x{h} -> {args.output} {out_w}x{out_h}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lanner.vision", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _array_mode(image):
    if image.mode in _ARRAY_MODES:
        return image
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    return image.convert("RGBA" if has_alpha else "RGB")  # e.g. palette, CMYK, 1-bit


def _parse_size(text):
    """WIDTHxHEIGHT -> (height, width), the order resize takes."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 640x480, got {text!r}") from None
    return height, width


def _parse_scale(text):
    """S -> S, or SXxSY -> (SY, SX), the order resize takes."""
    try:
        parts = [float(part) for part in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"scale must look like 2 or 1.5x2, got {text!r}")
    return parts[0] if len(parts) == 1 else (parts[1], parts[0])
