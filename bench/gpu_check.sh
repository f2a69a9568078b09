#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (torch and triton present, nothing else installed): run the attention
# tests natively, the attention benchmark, and the throughput benchmark when it exists. Results go to OUTDIR.
# Budget: 200 s tests + 170 s attention bench + 90 s throughput < 8 minutes.
#
#     bash bench/gpu_check.sh OUTDIR
set -u
OUT=$(mkdir -p "${1:?usage: bench/gpu_check.sh OUTDIR}" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" LANNER_TEST_DEVICE=cuda
unset TRITON_INTERPRET

step() {  # step NAME SECONDS CMD...: run with a time limit, keep output and exit status
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
    echo "   exit $? ($(tail -n 1 "$OUT/$name.out" | cut -c1-200))" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
  torch.cuda.get_device_name())"; } > "$OUT/machine.txt" 2>&1

if python -c "import pytest" 2>/dev/null; then
    step test_attention 200 python -m pytest tests/test_attention.py -q -rs
else  # no pytest on the box: a minimal runner for the marks and fixtures that file uses
    step test_attention 200 python - <<'EOF'
import itertools, sys, types, traceback
class Skip(Exception): pass
class Mark:
    def __init__(self, name, args): self.name, self.args = name, args
    def __call__(self, fn): fn.__dict__.setdefault("marks", []).append(self); return fn
class Param:
    def __init__(self, *values, marks=()): self.values, self.marks = values, marks if isinstance(marks, (list, tuple)) else (marks,)
class Raises:
    def __init__(self, exc): self.exc = exc
    def __enter__(self): return self
    def __exit__(self, typ, val, tb):
        if typ is None: raise AssertionError(f"did not raise {self.exc}")
        return issubclass(typ, self.exc)
class MonkeyPatch:
    def __init__(self): self.undo = []
    def setattr(self, obj, name, value): self.undo.append((obj, name, getattr(obj, name))); setattr(obj, name, value)
pytest = types.ModuleType("pytest")
pytest.mark = types.SimpleNamespace(parametrize=lambda names, values: Mark("parametrize", (names, values)),
                                    skipif=lambda cond, reason="": Mark("skipif", (cond, reason)))
pytest.param, pytest.raises = Param, Raises
pytest.skip = lambda reason="": (_ for _ in ()).throw(Skip(reason))
sys.modules["pytest"] = pytest
sys.path.insert(0, "tests")
import test_attention as t
passed = failed = skipped = 0
for name, fn in [(n, f) for n, f in vars(t).items() if n.startswith("test_") and callable(f)]:
    marks = fn.__dict__.get("marks", [])
    if any(m.name == "skipif" and m.args[0] for m in marks):
        skipped += 1; continue
    axes = []
    for m in (m for m in marks if m.name == "parametrize"):
        keys = [k.strip() for k in m.args[0].split(",")]
        axes.append([(keys, v.values if isinstance(v, Param) else (v if len(keys) > 1 else (v,)),
                      getattr(v, "marks", ())) for v in m.args[1]])
    for combo in itertools.product(*axes):
        kwargs = {k: v for keys, values, _ in combo for k, v in zip(keys, values)}
        if any(mk.name == "skipif" and mk.args[0] for _, _, ms in combo for mk in ms):
            skipped += 1; continue
        patch = MonkeyPatch()
        if "monkeypatch" in fn.__code__.co_varnames[:fn.__code__.co_argcount]: kwargs["monkeypatch"] = patch
        try: fn(**kwargs); passed += 1
        except Skip: skipped += 1
        except Exception: failed += 1; print("FAILED", name, kwargs); traceback.print_exc()
        finally:
            for obj, attr, old in reversed(patch.undo): setattr(obj, attr, old)
print(f"{failed} failed, {passed} passed, {skipped} skipped (minimal runner: no pytest here)")
sys.exit(1 if failed else 0)
EOF
fi

step bench_attention 170 python bench/attention.py --device cuda
if [ -f bench/throughput.py ]; then
    step bench_throughput 90 python bench/throughput.py --device cuda --quick
fi
echo "results in $OUT"
