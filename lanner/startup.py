"""Start-up without the cyclic garbage collector's full sweeps."""
import atexit
import contextlib
import gc


@contextlib.contextmanager
def collector_paused():
    """No cyclic collection while the body builds long-lived objects, which are then frozen out of later ones.
    Importing torch and reading a model (a tokenizer's 100k strings, the tensors' tables) make hundreds of
    thousands of objects, none of them garbage, and each full collection walked them all: `lanner generate "Hi"`
    spent 0.2-0.25 s of its ~2.1 s in them (Zen 3, 3 alternating runs each way). Frozen, they no longer make
    the serving steps' collections longer either."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


# the interpreter's last collection then sees them: extensions (nanobind's) report objects it never freed as leaks
atexit.register(gc.unfreeze)
