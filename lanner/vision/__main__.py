"""python -m lanner.vision IN OUT (--scale S | --size WxH)."""
import sys

from lanner.vision.cli import main

if __name__ == "__main__":
    sys.exit(main())
