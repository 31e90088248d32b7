"""Counts of the last `mutmut run` per module and function, as the Markdown tables of
tests/MUTATION.md: `python -m tests.mutation_report` (after `make mutation`).

Reads mutmut's own result files (`mutants/**/*.py.meta`); statuses as mutmut names them.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    36: "timeout",
    -24: "timeout",
    -9: "timeout",  # killed after the CPU limit
    255: "crashed",  # the test run died before pytest reported (e.g. import failed)
    -11: "crashed",
}
COLUMNS = ("killed", "crashed", "survived", "no tests", "timeout", "other")


def results(root: Path = Path("mutants")) -> dict[str, dict[str, collections.Counter]]:
    """module -> function -> Counter of statuses."""
    out: dict[str, dict[str, collections.Counter]] = {}
    for meta in sorted(root.rglob("*.py.meta")):
        module = str(meta.relative_to(root)).removesuffix(".meta")
        functions = out.setdefault(module, {})
        for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            function = re.sub(r"__mutmut_\d+$", "", key.rsplit(".", 1)[-1])
            function = function.removeprefix("xǁ").removeprefix("x_").replace("ǁ", ".")
            status = STATUS.get(code, "other")
            functions.setdefault(function, collections.Counter())[status] += 1
    return out


def row(name: str, counts: collections.Counter) -> str:
    total = sum(counts.values())
    # a mutant that makes the tests crash or run forever is caught as surely as one
    # that makes them fail
    caught = counts["killed"] + counts["crashed"] + counts["timeout"]
    tested = caught + counts["survived"]
    score = f"{100 * caught / tested:.0f} %" if tested else "-"
    cells = " | ".join(str(counts[c]) for c in COLUMNS)
    return f"| {name} | {total} | {cells} | {score} |"


def markdown(found: dict[str, dict[str, collections.Counter]]) -> str:
    head = "| {} | mutants | " + " | ".join(COLUMNS) + " | caught / tested |"
    rule = "|---|---:|" + "---:|" * len(COLUMNS) + "---:|"
    lines = [head.format("module"), rule]
    total = collections.Counter()
    for module, functions in found.items():
        counts = sum(functions.values(), collections.Counter())
        total += counts
        lines.append(row(f"`{module}`", counts))
    lines.append(row("**all**", total))
    for module, functions in found.items():
        lines += ["", f"`{module}`", "", head.format("function"), rule]
        lines += [row(f"`{name}`", counts) for name, counts in functions.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(results()))
