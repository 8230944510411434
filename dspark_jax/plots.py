"""PNG figures of an evaluation (spec §7, §8): per-slot conditional acceptance and prefix survival per benchmark,
the confidence reliability diagram, tokens/s per verify policy.

Input is the results dict `python -m dspark_jax.evaluate` writes (results.json): `rows` (one per benchmark, draft and
verify policy), `macro_average` (one per draft and policy) and `calibration` (per draft, pooled over benchmarks).
matplotlib is imported when a figure is drawn, through its object API on the Agg canvas (no pyplot state, no
display needed).
"""

from __future__ import annotations

import os

from dspark_jax.errors import UsageError


def _figure(panels: int, width: float = 5.0, height: float = 3.6):
    """(figure, canvas, axes list) with `panels` side-by-side axes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("the --out plots need matplotlib (pip install matplotlib)") from None
    fig = Figure(figsize=(width * panels, height), layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, canvas, list(axes)


def _combos(results: dict) -> list[tuple[str, str]]:
    """(draft, verify) pairs in the order they were evaluated."""
    seen = []
    for r in results["rows"]:
        key = (r["draft"], r["verify"])
        if key not in seen:
            seen.append(key)
    return seen


def _title(draft: str, verify: str, combos) -> str:
    return f"{draft} ({verify})" if len({v for _, v in combos}) > 1 else draft


def _per_slot(results: dict, key: str, ylabel: str, path: str) -> str:
    combos = _combos(results)
    fig, canvas, axes = _figure(len(combos))
    macro = {(m["draft"], m["verify"]): m for m in results.get("macro_average", [])}
    for ax, (draft, verify) in zip(axes, combos):
        for r in results["rows"]:
            if (r["draft"], r["verify"]) == (draft, verify) and r.get(key):
                ax.plot(range(len(r[key])), r[key], marker="o", markersize=3, label=r["benchmark"])
        m = macro.get((draft, verify), {}).get(key)
        if m:
            ax.plot(range(len(m)), m, color="black", linestyle="--", linewidth=2, label="macro average")
        ax.set_title(_title(draft, verify, combos))
        ax.set_xlabel("slot j")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    canvas.print_png(path)
    return path


def _reliability(results: dict, path: str) -> str | None:
    """One panel per draft with a confidence head (raw confidences), and one more with its calibration.json
    temperatures applied when it has them; a line per slot."""
    panels = []
    for draft, cal in results.get("calibration", {}).items():
        if cal.get("reliability"):
            panels.append((f"{draft}: raw", cal["reliability"], cal.get("summary", {}).get("ece")))
        if cal.get("reliability_calibrated"):
            ece = cal.get("calibrated", {}).get("summary", {}).get("ece")
            panels.append((f"{draft}: calibrated", cal["reliability_calibrated"], ece))
    if not panels:
        return None
    fig, canvas, axes = _figure(len(panels), width=4.6, height=4.2)
    for ax, (title, reliability, ece) in zip(axes, panels):
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect calibration")
        for j, bins in enumerate(reliability):
            pts = [(p, y) for p, y in zip(bins["mean_prediction"], bins["mean_label"]) if p is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=f"slot {j}")
        ax.set_title(title + (f" (ECE {ece:.3f})" if ece is not None else ""))
        ax.set_xlabel("predicted prefix acceptance s_j")
        ax.set_ylabel("observed prefix acceptance")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    canvas.print_png(path)
    return path


def _tokens_per_s(results: dict, path: str) -> str | None:
    policies = list(dict.fromkeys(r["verify"] for r in results["rows"]))
    if len(policies) < 2:
        return None
    drafts = list(dict.fromkeys(r["draft"] for r in results["rows"]))
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in results["rows"]))
    plain = {r["benchmark"]: r.get("plain_tokens_per_s") for r in results["rows"]}
    series = policies + (["plain"] if any(v is not None for v in plain.values()) else [])
    fig, canvas, axes = _figure(len(drafts), width=max(5.0, 1.2 * len(benchmarks) * len(series) / 2))
    width = 0.8 / len(series)
    for ax, draft in zip(axes, drafts):
        for k, policy in enumerate(series):
            if policy == "plain":
                values = [plain.get(b) for b in benchmarks]
            else:
                tps = {
                    r["benchmark"]: r.get("tokens_per_s")
                    for r in results["rows"]
                    if (r["draft"], r["verify"]) == (draft, policy)
                }
                values = [tps.get(b) for b in benchmarks]
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(benchmarks))]
            ax.bar(xs, [v or 0.0 for v in values], width=width, label=policy)
        ax.set_xticks(range(len(benchmarks)), benchmarks, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{draft}: tokens/s per verify policy")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    canvas.print_png(path)
    return path


def write_plots(results: dict, out_dir: str) -> list[str]:
    """Draw the evaluation's figures into `out_dir`; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = [
        _per_slot(
            results,
            "conditional_acceptance",
            "conditional acceptance",
            os.path.join(out_dir, "conditional_acceptance.png"),
        ),
        _per_slot(results, "prefix_survival", "prefix survival", os.path.join(out_dir, "prefix_survival.png")),
        _reliability(results, os.path.join(out_dir, "reliability.png")),
        _tokens_per_s(results, os.path.join(out_dir, "tokens_per_s.png")),
    ]
    return [p for p in written if p]


__all__ = ["write_plots"]
