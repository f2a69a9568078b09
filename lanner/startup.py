"""Start-up without the cyclic garbage collector's full sweeps."""
import atexit
import contextlib
import gc


@contextlib.contextmanager
def collector_paused(freeze: bool = False):
    """No cyclic collection while the body builds long-lived objects. Importing torch and reading a model make
    hundreds of thousands of objects, none of them garbage, and each full collection walked them all: `lanner
    generate "Hi"` spent 0.2-0.25 s of its ~2.1 s in them (Zen 3, 3 alternating runs each way). freeze: move
    every object alive to the permanent generation after (modules, which live as long as the process), so
    that later collections skip them; never for objects that may become garbage, which it would never free."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if enabled:
            gc.enable()


# the interpreter's last collection then sees them: extensions (nanobind's) report objects it never freed as leaks
atexit.register(gc.unfreeze)
