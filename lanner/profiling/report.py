"""A profile's results as a terminal table, CSV / JSON files and PNG plots (time shares and a roofline)."""
import csv
import json
import os

from lanner.profiling.machine import Machine
from lanner.profiling.profile import CaseResult

# Display groups of the timed components, in stacking order. "overhead" is what the plain step took beyond
# the model components and sampling (so the groups add up to the step exactly).
GROUPS = {
    "attention": ("attention core + KV write", ("attention", "kv_store")),
    "qkv_o": ("QKV + O projections", ("qkv_proj", "o_proj")),
    "mlp": ("MLP (gate/up, act, down)", ("gate_up_proj", "mlp_act", "down_proj")),
    "ssm": ("SSM mixer (projections, conv, scan)", ("ssm_in_proj", "ssm_conv", "ssm_dt_bc_proj", "ssm_scan",
                                                    "ssm_out_proj")),
    "norm_rotary": ("norms + rotary + embedding", ("norms", "rotary", "embedding")),
    "lm_head": ("LM head", ("lm_head",)),
    "sampling": ("sampling", ("sampling",)),
    "overhead": ("engine overhead (schedule, metadata, Python)", ()),
}
COLORS = {"attention": "#d62728", "qkv_o": "#ff7f0e", "mlp": "#1f77b4", "ssm": "#17becf", "norm_rotary": "#9467bd",
          "lm_head": "#2ca02c", "sampling": "#8c564b", "overhead": "#7f7f7f"}
ROOFLINE_GROUPS = ("attention", "qkv_o", "mlp", "ssm", "lm_head")   # the matmul-shaped work


def group_of(component: str) -> str:
    return next((g for g, (_, members) in GROUPS.items() if component in members), "overhead")


def group_ms(r: CaseResult) -> dict[str, float]:
    out = {g: sum(r.components_ms.get(c, 0.0) for c in members) for g, (_, members) in GROUPS.items()}
    out["overhead"] = r.overhead_ms
    return out


def group_cost(r: CaseResult, group: str) -> tuple[float, float]:
    members = GROUPS[group][1]
    return (sum(r.costs[c]["flops"] for c in members if c in r.costs),
            sum(r.costs[c]["bytes"] for c in members if c in r.costs))


def case_label(r: CaseResult) -> str:
    return f"B={r.batch} C={r.context}"


# ---- rows ---------------------------------------------------------------------------------------------
def component_rows(results: list[CaseResult], machine: Machine) -> list[dict]:
    """One row per (case, component): time, share of the step, FLOPs, bytes, achieved rates, bound."""
    rows = []
    for r in results:
        for name, ms in sorted(r.components_ms.items()):
            cost = r.costs.get(name, {"flops": 0.0, "bytes": 0.0})
            rows.append(rate_row(r, name, group_of(name), ms, cost["flops"], cost["bytes"], machine))
    return rows


def group_rows(results: list[CaseResult], machine: Machine) -> list[dict]:
    rows = []
    for r in results:
        for g, ms in group_ms(r).items():
            flops, moved = group_cost(r, g) if g != "overhead" else (0.0, 0.0)
            rows.append(rate_row(r, g, g, ms, flops, moved, machine))
    return rows


def rate_row(r: CaseResult, name: str, group: str, ms: float, flops: float, moved: float, machine: Machine) -> dict:
    seconds = ms / 1e3
    intensity = flops / moved if moved else 0.0
    gflops = flops / seconds / 1e9 if seconds > 0 else 0.0
    roof = machine.roof(intensity) if flops else 0.0
    return {"phase": r.phase, "batch": r.batch, "context": r.context, "tokens": r.tokens, "component": name,
            "group": group, "time_ms": round(ms, 4), "share": round(ms / r.step_ms, 5), "flops": flops,
            "bytes": moved, "intensity": round(intensity, 4), "gflops": round(gflops, 3),
            "gbs": round(moved / seconds / 1e9, 3) if seconds > 0 else 0.0, "roof_gflops": round(roof, 3),
            "pct_of_roof": round(100 * gflops / roof, 2) if roof else None,
            "bound": machine.bound(intensity) if flops else "memory" if moved else "-"}


def case_rows(results: list[CaseResult]) -> list[dict]:
    rows = []
    for r in results:
        shares = {f"share_{g}": round(ms / r.step_ms, 5) for g, ms in group_ms(r).items()}
        rows.append({"phase": r.phase, "batch": r.batch, "context": r.context, "tokens": r.tokens,
                     "step_ms": round(r.step_ms, 4), "instrumented_ms": round(r.instrumented_ms, 4),
                     "measured_ms": round(r.measured_ms, 4), "coverage": round(r.coverage, 4),
                     "overhead_ms": round(r.overhead_ms, 4), **shares})
    return rows


# ---- terminal -----------------------------------------------------------------------------------------
def table(results: list[CaseResult], machine: Machine) -> str:
    short = {"attention": "attn", "qkv_o": "qkv+o", "mlp": "mlp", "ssm": "ssm", "norm_rotary": "norm+rope", "lm_head": "lm_head",
             "sampling": "sample", "overhead": "overhead"}
    head = f"{'phase':<8}{'B':>4}{'C':>6}{'tokens':>8}{'step ms':>10}" + "".join(f"{s:>10}" for s in short.values())
    lines = [head + f"{'measured/step':>15}  bottleneck (bound, % of roof)", "-" * (len(head) + 48)]
    for r in results:
        shares = group_ms(r)
        top = max(ROOFLINE_GROUPS, key=lambda g: shares[g])
        flops, moved = group_cost(r, top)
        row = rate_row(r, top, top, shares[top], flops, moved, machine)
        lines.append(f"{r.phase:<8}{r.batch:>4}{r.context:>6}{r.tokens:>8}{r.step_ms:>10.1f}"
                     + "".join(f"{100 * shares[g] / r.step_ms:>9.1f}%" for g in short)
                     + f"{r.coverage:>14.1%}  {short[top]} ({row['bound']}, {row['pct_of_roof']:.0f}%)")
    lines.append(f"machine: {machine.device} {machine.dtype}, {machine.threads} threads: peak matmul "
                 f"{machine.peak_gflops:.0f} GFLOP/s, copy bandwidth {machine.peak_gbs:.1f} GB/s, "
                 f"ridge {machine.ridge:.1f} FLOP/byte")
    return "\n".join(lines)


# ---- files --------------------------------------------------------------------------------------------
def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(results: list[CaseResult], machine: Machine, out_dir: str, meta: dict | None = None,
                  plots: bool = True) -> dict[str, str]:
    """profile.json, cases.csv, components.csv (+ breakdown.png, roofline.png); returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in [("json", "profile.json"), ("cases", "cases.csv"),
                                                      ("components", "components.csv")]}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta or {}, "machine": machine.to_dict(), "cases": [r.to_dict() for r in results],
                   "groups": {g: list(members) for g, (_, members) in GROUPS.items()}}, f, indent=1)
    write_csv(paths["cases"], case_rows(results))
    write_csv(paths["components"], component_rows(results, machine))
    if plots:
        paths["breakdown"] = plot_breakdown(results, os.path.join(out_dir, "breakdown.png"), meta)
        paths["roofline"] = plot_roofline(results, machine, os.path.join(out_dir, "roofline.png"), meta)
    return paths


def load_results(path: str) -> tuple[list[CaseResult], Machine, dict]:
    with open(path) as f:
        data = json.load(f)
    m = {k: v for k, v in data["machine"].items() if k != "ridge_flop_per_byte"}
    return [CaseResult.from_dict(c) for c in data["cases"]], Machine(**m), data.get("meta", {})


# ---- plots --------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def subtitle(meta: dict | None) -> str:
    if not meta:
        return ""
    model = os.path.basename(str(meta.get("model", "")))
    return f"{model} · {meta.get('dtype', '')} · attention={meta.get('attention_backend', '')} · " \
           f"{meta.get('device', '')}, {meta.get('threads', '?')} threads"


def plot_breakdown(results: list[CaseResult], path: str, meta: dict | None = None) -> str:
    """Stacked bars: each component group's share of the step, per case, prefill and decode side by side."""
    plt = _pyplot()
    phases = [p for p in ("prefill", "decode") if any(r.phase == p for r in results)]
    widths = [sum(r.phase == p for r in results) for p in phases]
    fig, axes = plt.subplots(1, len(phases), figsize=(max(9.0, 2.0 + 0.9 * sum(widths)), 6.0), squeeze=False,
                             gridspec_kw={"width_ratios": widths}, sharey=True)
    for ax, phase in zip(axes[0], phases):
        cases = [r for r in results if r.phase == phase]
        bottom = [0.0] * len(cases)
        for g, (label, _) in GROUPS.items():
            heights = [100 * max(group_ms(r)[g], 0.0) / r.step_ms for r in cases]
            ax.bar(range(len(cases)), heights, bottom=bottom, color=COLORS[g], label=label, width=0.75)
            bottom = [b + h for b, h in zip(bottom, heights)]
        for x, (r, top) in enumerate(zip(cases, bottom)):
            ax.text(x, top + 1, f"{r.step_ms:.0f} ms" if r.step_ms >= 10 else f"{r.step_ms:.1f} ms",
                    ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(cases)), [f"B={r.batch}\nC={r.context}" for r in cases], fontsize=8)
        ax.set_title(f"{phase} (step time above each bar)", fontsize=10)
        ax.set_xlabel("batch size B, context length C (tokens)", fontsize=9)
        ax.set_ylim(0, 112)
        ax.axhline(100, color="black", lw=0.6, ls="--")
    axes[0][0].set_ylabel("share of the step time (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Where an engine step's time goes\n" + subtitle(meta), fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_roofline(results: list[CaseResult], machine: Machine, path: str, meta: dict | None = None) -> str:
    """Log-log roofline: achieved GFLOP/s vs arithmetic intensity of the matmul-shaped groups, per case."""
    plt = _pyplot()
    points = []
    for r in results:
        for g in ROOFLINE_GROUPS:
            flops, moved = group_cost(r, g)
            ms = group_ms(r)[g]
            if flops and moved and ms > 0:
                points.append((r, g, flops / moved, flops / (ms / 1e3) / 1e9))
    fig, ax = plt.subplots(figsize=(10.5, 7))
    xs = [p[2] for p in points] + [machine.ridge]
    lo, hi = min(xs) / 3, max(xs) * 3
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [machine.roof(x) for x in grid], color="black", lw=1.5)
    ax.axvline(machine.ridge, color="black", ls=":", lw=0.8)
    ax.text(machine.ridge * 1.08, machine.peak_gflops * 1.12,
            f"peak matmul {machine.peak_gflops:.0f} GFLOP/s\nridge {machine.ridge:.1f} FLOP/B", fontsize=8, va="bottom")
    ax.text(lo * 1.2, machine.roof(lo * 1.2) * 1.3, f"memory {machine.peak_gbs:.1f} GB/s", fontsize=8, rotation=0)
    markers = {"prefill": "o", "decode": "^"}
    for g in ROOFLINE_GROUPS:
        for phase, marker in markers.items():
            pts = [p for p in points if p[1] == g and p[0].phase == phase]
            if pts:
                ax.scatter([p[2] for p in pts], [p[3] for p in pts], color=COLORS[g], marker=marker, s=36,
                           label=f"{GROUPS[g][0]}, {phase}", edgecolor="black", linewidth=0.4, zorder=3)
    for r, g, x, y in points:
        ax.annotate(f"{r.phase[0]} B{r.batch} C{r.context}", (x, y), xytext=(4, 2), textcoords="offset points",
                    fontsize=5.5, color=COLORS[g])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(min(p[3] for p in points) / 3, machine.peak_gflops * 2.5)
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    ax.set_ylabel("achieved throughput (GFLOP/s)")
    ax.set_title("Roofline: each point is one component group in one step (p = prefill, d = decode)\n"
                 + subtitle(meta), fontsize=10)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
