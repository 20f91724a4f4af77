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
