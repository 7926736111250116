"""``space: auto``: a sweep's groups and sparsity ranges chosen from a sensitivity profile.

Each coupled set of the profile (:mod:`pruneflow.sensitivity`) is a candidate group. Its range runs from 0
to the largest sparsity of the profile's grid up to which the recalibrated Top-1 never drops by more than
``tolerance`` points; a set whose first grid point already drops more, or that saves less than
``min_saved_pct`` of the dense latency within its range, is left out. When more than ``max_groups`` sets
remain, neighbouring sets of one stage (the same first name component, e.g. ``layer2``) are merged, the
pair with the closest bounds first (then the smallest combined saving); a merged group's range is the
narrower of the two, so no member goes past its own bound, and merging sets of alike bounds narrows least.

The result is an explicit list of ranges (what a hand-written ``space`` holds), so a sweep that used it
can be re-run as it was.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pruneflow.constants import MAX_SPARSITY

__all__ = ["AutoSpace", "auto_space", "set_bound"]


class AutoSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: str = Field(..., min_length=1, description="the sensitivity profile (profile.json of "
                         "`pruneflow sensitivity`)")
    tolerance: float = Field(1.0, ge=0, le=100, description="the largest recalibrated Top-1 drop (points) a "
                             "set's range may reach")
    max_groups: int = Field(8, ge=1, le=64, description="beyond this many groups, neighbouring sets of one stage "
                            "are merged (never across stages, so more groups remain when every stage is down to one)")
    min_saved_pct: float = Field(0.5, ge=0, le=100, description="sets saving less latency than this (percent of "
                                 "the dense model) within their range are left out")
    step: float | None = Field(None, gt=0, le=MAX_SPARSITY, description="grid step of every range (the grid "
                               "sampler needs one)")


def set_bound(points: list[dict], tolerance: float) -> tuple[float, float]:
    """(upper bound, latency saved % at it) of one set: the largest sparsity whose drop, and every lower
    sparsity's, is within ``tolerance``; (0, 0) when the first one is not."""
    bound, saved = 0.0, 0.0
    for p in sorted(points, key=lambda p: p["sparsity"]):
        if p["top1_drop"] > tolerance:
            break
        bound, saved = p["sparsity"], max(saved, p["latency_saved_pct"])
    return bound, saved


def _stage(layer: str) -> str:
    return layer.split(".", 1)[0]


def auto_space(profile: dict[str, Any], auto: AutoSpace) -> list[dict[str, Any]]:
    """The explicit sweep space (``SparsityRange`` dicts) that ``auto`` chooses from ``profile``."""
    groups = []
    for s in profile["sets"]:
        high, saved = set_bound(s["points"], auto.tolerance)
        if high <= 0 or saved < auto.min_saved_pct:
            continue
        groups.append({"names": [s["set"]], "patterns": list(s["layers"]), "high": high, "saved": saved,
                       "stage": _stage(s["layers"][0])})
    while len(groups) > auto.max_groups:
        pairs = [i for i in range(len(groups) - 1) if groups[i]["stage"] == groups[i + 1]["stage"]]
        if not pairs:
            break  # one set per stage left: merging across stages would mix unrelated layers
        i = min(pairs, key=lambda i: (abs(groups[i]["high"] - groups[i + 1]["high"]),
                                      groups[i]["saved"] + groups[i + 1]["saved"]))
        a, b = groups[i], groups.pop(i + 1)
        groups[i] = {"names": a["names"] + b["names"], "patterns": a["patterns"] + b["patterns"],
                     "high": min(a["high"], b["high"]), "saved": a["saved"] + b["saved"], "stage": a["stage"]}
    space = []
    for g in groups:
        r = {"name": "-".join(g["names"]) if len(g["names"]) <= 2 else f"{g['names'][0]}..{g['names'][-1]}",
             "patterns": g["patterns"], "low": 0.0, "high": g["high"]}
        if auto.step is not None:
            r["step"] = auto.step
        space.append(r)
    return space
