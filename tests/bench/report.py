"""Markdown tables and result files shared by the benchmarks."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path("bench_results")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:,.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, title: str, table: str, notes: str = "") -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(f"## {title}\n\n{table}\n\n{notes}".rstrip() + "\n")
    print(f"\n## {title}\n\n{table}\n\n{notes}".rstrip() + "\n", flush=True)
    return path


def peak_rss_mb() -> float:
    """This process's peak resident memory. Read from VmHWM, which starts afresh at exec,
    unlike getrusage's ru_maxrss, which a child inherits from the process that forked it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bar_chart(
    name: str, title: str, groups: dict[str, dict[str, float]], ylabel: str, log: bool = False
) -> Path:
    """Grouped bars: `groups` maps an x label to {series: value}; saved as <name>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    width = 0.8 / max(1, len(series))
    fig, axis = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for n, label in enumerate(series):
        xs = [x + n * width for x in range(len(groups))]
        axis.bar(xs, [values.get(label, 0.0) for values in groups.values()], width, label=label)
    axis.set_xticks(
        [x + width * (len(series) - 1) / 2 for x in range(len(groups))], list(groups), fontsize=8
    )
    axis.set(ylabel=ylabel, title=title)
    if log:
        axis.set_yscale("log")
    axis.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        axis.legend(fontsize=8)
    fig.tight_layout()
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
