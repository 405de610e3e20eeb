"""Paired comparisons over seeds: one method against each other, run by run.

In a comparison every method trains from the same seeded initialisation and data order per seed, so the
runs of two methods at one seed differ only in the method. Differencing them seed by seed removes the
seed's share of the spread, which the mean ± std columns keep; the count of seeds a method wins says how
often the difference holds, not only on average.
"""

from __future__ import annotations

import statistics


def paired_differences(rows: list[dict], method: str, domains: list[str]) -> list[dict]:
    """``method`` against every other method row, on the seeds both ran.

    Args:
        rows: comparison rows (``method``, ``label``, ``seeds``, ``miou[domain]["values"]`` in seed order).
        method: the row compared with every other one (e.g. ``gkd``).
        domains: the domains to compare on.

    Returns:
        One entry per other row with common seeds: ``{"method", "label", "seeds", "domains": {domain:
        {"differences", "mean", "wins"}}}``, a difference being ``method``'s mIoU minus the other's at one seed
        and ``wins`` the number of seeds where it is above zero.
    """
    by_method = {row["method"]: row for row in rows}
    if method not in by_method:
        raise KeyError(f"no row {method!r} to pair with; rows: {', '.join(by_method)}")
    ours = by_method[method]
    paired = []
    for other in rows:
        common = [seed for seed in ours["seeds"] if seed in other["seeds"]]
        if other["method"] == method or not common:
            continue
        entry: dict = {"method": other["method"], "label": other["label"], "seeds": common, "domains": {}}
        for domain in domains:
            mine = dict(zip(ours["seeds"], ours["miou"][domain]["values"], strict=True))
            theirs = dict(zip(other["seeds"], other["miou"][domain]["values"], strict=True))
            differences = [mine[seed] - theirs[seed] for seed in common]
            entry["domains"][domain] = {
                "differences": differences,
                "mean": statistics.fmean(differences),
                "wins": sum(difference > 0 for difference in differences),
            }
        paired.append(entry)
    return paired


def render_paired(paired: list[dict], label: str, domains: list[str]) -> str:
    """``paired_differences`` as a markdown table: mean difference (points) and seeds won, per domain.

    Args:
        paired: `paired_differences` output.
        label: the compared method's label (``GKD``).
        domains: the domains, in column order.
    """
    header = "| " + label + " vs | seeds | " + " | ".join(f"{domain}: Δ mIoU, seeds won" for domain in domains) + " |"
    lines = [header, "|---|---|" + "---|" * len(domains)]
    for entry in paired:
        cells = [
            f"{entry['domains'][domain]['mean']:+.1f}, {entry['domains'][domain]['wins']} of {len(entry['seeds'])}"
            for domain in domains
        ]
        lines.append(f"| {entry['label']} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
