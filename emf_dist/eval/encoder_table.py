"""The markdown table of an encoder evaluation's result, then its selection decision."""

from __future__ import annotations

from typing import Any


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def encoder_table(result: dict[str, Any]) -> str:
    """The markdown table of an `evaluate_encoders` result, then the decision."""
    lines = ["| encoder | kind | discriminability | R@1 | chance | disent. pooled | corrected | b | "
             "disent. token | corrected | b | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = result["selection"]["verdicts"]
    for row in result["encoders"]:
        d, s = row["discriminability"], row["disentanglement"]
        verdict = ("selected" if row["name"] == result["selection"]["selected"] else
                   "pass" if verdicts.get(row["name"], {}).get("passed") else
                   "fail" if row["kind"] == "candidate" else "reference")
        lines.append(f"| {row['name']} | {row['kind']} | {_fmt(d['score'])} | {_fmt(d['recall_at_1'])} | "
                     f"{_fmt(d['chance'])} | {_fmt(s['pooled'])} | {_fmt(s['pooled_corrected'])} | "
                     f"{_fmt(s['baseline_pooled'])} | {_fmt(s['token'])} | {_fmt(s['token_corrected'])} | "
                     f"{_fmt(s['baseline_token'])} | {verdict} |")
    selected = result["selection"]["selected"]
    lines.append("")
    lines.append(f"Selected: **{selected}**." if selected else "Selected: **none** - no candidate passed.")
    for name, verdict in verdicts.items():
        if verdict["reasons"]:
            lines.append(f"- {name}: " + "; ".join(verdict["reasons"]))
    return "\n".join(lines)
