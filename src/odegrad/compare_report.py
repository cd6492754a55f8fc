"""The output of `odegrad compare`: the text table and the figure of a report."""

from __future__ import annotations

from .compare_problems import REFERENCE_METHOD, REFERENCE_TOL


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _mb(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _err(value) -> str:
    if value is None:
        return "-"
    return "0" if value == 0.0 else f"{value:.1e}"


def _count(value) -> str:
    return "-" if value is None else str(value)


def format_table(report: dict) -> str:
    """The report as the text table `odegrad compare` prints."""
    meta, config = report["meta"], report["config"]
    header = ("gradient", "solver", "fwd ms", "f+b ms", "peak MB", "ckpt MB", "NFE f", "NFE b",
              "err scheme", "err ODE")
    lines = [f"odegrad compare: {meta['problem']}",
             f"device: {meta['device']} (threads: {meta['threads']}), torch {meta['torch']}; "
             f"times: median of {config['repeats']} forward+backward runs",
             ""]
    widths = (26, 18, 8, 8, 8, 8, 6, 6, 10, 9)

    def line(cells) -> str:
        out = [f"{cells[0]:<{widths[0]}}", f"{cells[1]:<{widths[1]}}"]
        out += [f"{c:>{w}}" for c, w in zip(cells[2:], widths[2:])]
        return " ".join(out).rstrip()

    lines.append(line(header))
    lines.append("-" * (sum(widths) + len(widths) - 1))
    for r in report["rows"]:
        if r.get("error"):
            message = r["error"].splitlines()[0] if r["error"] else ""
            if len(message) > 120:
                message = message[:117] + "..."
            lines.append(f"{r['label']:<{widths[0]}} {r['solver']:<{widths[1]}} error: {message}")
            continue
        lines.append(line((
            r["label"], r["solver"], _ms(r.get("forward_ms")), _ms(r.get("total_ms")),
            _mb(r.get("peak_bytes")), _mb(r.get("checkpoint_bytes")),
            _count(r.get("nfe_forward")), _count(r.get("nfe_backward")),
            _err(r.get("err_scheme")), _err(r.get("err_ode")),
        )))
    memory = next((r["memory"] for r in report["rows"] if r.get("memory")), "-")
    lines += [
        "",
        "err scheme: vs the exact float64 gradient of the same scheme and steps (exact methods: "
        "round-off)",
        f"err ODE: vs the float64 gradient of the exact solution ({REFERENCE_METHOD}, "
        f"rtol=atol={REFERENCE_TOL:g}) (continuous adjoints: tolerance-sized)",
        f"peak MB: {memory}, above what was resident before the run"
        + ("; each method in its own process" if meta["isolated"] else "; in one process"),
    ]
    for name, error in meta.get("reference_errors", {}).items():
        lines.append(f"reference {name} failed: {error}")
    return "\n".join(lines)


def write_plot(report: dict, path: str) -> None:
    """Time and memory bars and the gradient errors on a log scale, as an image file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if not r.get("error")]
    labels = [r["label"] for r in rows]
    ypos = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(rows) + 2.0), sharey=True)
    total = [r.get("total_ms") or 0.0 for r in rows]
    forward = [r.get("forward_ms") or 0.0 for r in rows]
    axes[0].barh(ypos, total, color="tab:blue", label="forward+backward")
    axes[0].barh(ypos, forward, color="tab:cyan", label="forward")
    axes[0].set_xlabel("time per run (ms, median)")
    axes[0].legend(loc="best", fontsize="small")
    peak = [(r.get("peak_bytes") or 0) / 2**20 for r in rows]
    axes[1].barh(ypos, peak, color="tab:orange")
    axes[1].set_xlabel("peak memory (MB)")
    floor = 1e-17
    for offset, key, color, name in ((-0.2, "err_scheme", "tab:green", "vs scheme"),
                                     (0.2, "err_ode", "tab:red", "vs ODE")):
        values = [max(r.get(key) or 0.0, floor) if r.get(key) is not None else 0.0 for r in rows]
        axes[2].barh([y + offset for y in ypos], values, height=0.4, color=color, label=name,
                     left=floor)
        for y, r in zip(ypos, rows):
            if r.get(key) == 0.0:
                axes[2].text(floor * 3, y + offset, "0 (the reference itself)", va="center",
                             fontsize="x-small")
    axes[2].set_xscale("log")
    axes[2].set_xlim(left=floor)
    axes[2].set_xlabel("relative gradient error")
    axes[2].legend(loc="best", fontsize="small")
    axes[0].set_yticks(list(ypos))
    axes[0].set_yticklabels(labels)
    axes[0].invert_yaxis()
    fig.suptitle(report["meta"]["problem"], fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
