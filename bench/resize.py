"""Benchmark lanner.vision.resize against the per-pixel loop, torch, OpenCV and PIL.

    python bench/resize.py [--threads N]

Prints one JSON line per (case, implementation): the median time in ms and
ratio_vs_lanner = that time / lanner's time in the same case (so > 1 means slower than
lanner), plus max_diff_vs_lanner, the largest difference from lanner's output in uint8 levels.
Every implementation gets the same uint8 HWC image (torch a zero-copy channels-last view of it).
By default all run single-threaded (--threads 0 keeps each library's default): on a shared
2-core machine multi-threaded timings mostly measure the neighbours.
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from lanner.vision import resize

LOOP_BUDGET_S = 15.0  # past this the loop is timed on its first rows and extrapolated


def per_pixel_loop(image, out_h, out_w, row_budget_s=float("inf")):
    """The exercise's find() loop, corrected just enough to run: per-axis scale, x indexes rows
    (the exercise swapped them), and reads past the last row/column clamped to the edge.
    Returns (output, rows computed) -- fewer than out_h when it ran out of budget."""
    in_h, in_w = image.shape[:2]
    scale_x, scale_y = out_h / in_h, out_w / in_w

    def find(x, y):
        x1, y1 = int(x // scale_x), int(y // scale_y)
        x2, y2 = x1 + 1, y1 + 1
        fq11 = image[x1][y1]
        fq12 = image[x1][min(y2, in_w - 1)]
        fq21 = image[min(x2, in_h - 1)][y1]
        fq22 = image[min(x2, in_h - 1)][min(y2, in_w - 1)]
        new_x1, new_y1, new_x2, new_y2 = x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y
        fxy1 = (new_x2 - x) / (new_x2 - new_x1) * fq11 + (x - new_x1) / (new_x2 - new_x1) * fq21
        fxy2 = (new_x2 - x) / (new_x2 - new_x1) * fq12 + (x - new_x1) / (new_x2 - new_x1) * fq22
        return (new_y2 - y) / (new_y2 - new_y1) * fxy1 + (y - new_y1) / (new_y2 - new_y1) * fxy2

    out = np.zeros((out_h, out_w, image.shape[2]))
    start = time.perf_counter()
    for x in range(out_h):
        for y in range(out_w):
            out[x, y] = find(x, y)
        if time.perf_counter() - start > row_budget_s:
            return out, x + 1
    return out, out_h


def median_ms(fn, min_reps=5, max_reps=50, budget_s=1.0):
    fn()  # warm-up: caches, allocator, lazy init
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, len(times)


def as_hwc_uint8(x):
    if isinstance(x, torch.Tensor) and x.shape[0] == 3:  # torch's CHW
        x = x.permute(1, 2, 0)
    return np.clip(np.floor(np.asarray(x, dtype=np.float64) + 0.5), 0, 255).astype(np.uint8)


def implementations(image, out_h, out_w, antialias):
    """name -> zero-argument function computing the same resize (torch's result is CHW)."""
    import cv2
    from PIL import Image

    nchw = torch.from_numpy(image).permute(2, 0, 1)[None]  # channels-last memory, no copy
    pil = Image.fromarray(image)
    impls = {
        "lanner": lambda: resize(image, size=(out_h, out_w), antialias=antialias),
        "torch": lambda: F.interpolate(nchw, size=(out_h, out_w), mode="bilinear", antialias=antialias)[0],
    }
    if not antialias:  # OpenCV's INTER_LINEAR never widens the filter
        impls["opencv"] = lambda: cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    if antialias or out_h >= image.shape[0]:  # PIL's BILINEAR always does when downscaling
        impls["pil"] = lambda: np.asarray(pil.resize((out_w, out_h), Image.BILINEAR))
    return impls


def bench_case(image, out_h, out_w, antialias, threads):
    in_h, in_w, c = image.shape
    case = f"{in_w}x{in_h}x{c}->{out_w}x{out_h}" + (" antialias" if antialias else "")
    rows = []
    ours = None
    for name, fn in implementations(image, out_h, out_w, antialias).items():
        ms, reps = median_ms(fn)
        out = as_hwc_uint8(fn())
        ours = out if ours is None else ours
        rows.append({"case": case, "impl": name, "median_ms": round(ms, 4), "reps": reps,
                     "max_diff_vs_lanner": int(np.abs(out.astype(int) - ours).max())})
    if not antialias:
        rows.append(bench_loop(image, out_h, out_w, case))
    lanner_ms = rows[0]["median_ms"]
    for row in rows:
        row["ratio_vs_lanner"] = float(f"{row['median_ms'] / lanner_ms:.3g}")
        row.update(dtype="uint8", threads=threads or "default")
        print(json.dumps(row), flush=True)
    return rows


def bench_loop(image, out_h, out_w, case):
    """One timed run; if it would blow the budget, time the first rows and extrapolate."""
    start = time.perf_counter()
    out, rows_done = per_pixel_loop(image, out_h, out_w, row_budget_s=LOOP_BUDGET_S)
    ms = (time.perf_counter() - start) * 1e3 * out_h / rows_done
    # The loop is the asymmetric convention (src = dst / scale); check it against ours on its rows.
    ours = resize(image, size=(out_h, out_w), align="asymmetric")[:rows_done]
    row = {"case": case, "impl": "per_pixel_loop", "median_ms": round(ms, 1), "reps": 1,
           "max_diff_vs_lanner": int(np.abs(as_hwc_uint8(out[:rows_done]).astype(int) - ours).max()),
           "note": "compared with lanner align=asymmetric, the loop's convention"}
    if rows_done < out_h:
        row["extrapolated_from_rows"] = f"{rows_done}/{out_h}"
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and OpenCV; 0 = library default")
    args = parser.parse_args()
    if args.threads:
        import cv2

        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    rng = np.random.default_rng(0)
    small = bench_case(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), 512, 512, False, args.threads)
    big = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    bench_case(big, 224, 224, False, args.threads)
    bench_case(big, 224, 224, True, args.threads)

    ms = {row["impl"]: row["median_ms"] for row in small}
    faster_than_loop, vs_torch = ms["per_pixel_loop"] / ms["lanner"], ms["lanner"] / ms["torch"]
    ok = faster_than_loop >= 100 and vs_torch <= 5
    print(f"256x256 -> 512x512: lanner is {faster_than_loop:.0f}x the per-pixel loop (bar >= 100x) and "
          f"{vs_torch:.2f}x torch's time (bar <= 5x): {'PASS' if ok else 'FAIL'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
