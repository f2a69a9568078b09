"""Where lanner keeps what it fetches and builds: $LANNER_HOME, or ~/.cache/lanner."""
import os


def cache_dir() -> str:
    path = os.environ.get("LANNER_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "lanner")
    os.makedirs(path, exist_ok=True)
    return path
