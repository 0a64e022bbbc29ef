"""Attention statistics (docs/analysis.md), accumulated batch by batch.

All counts are over **valid** (query, key) pairs only: no padding on either side, and key ≤ query in decoder
self-attention. Weights are eval-mode, pre-dropout, fp32.

* sparsity rate  = #(valid pairs with weight exactly 0) / #(valid pairs)
* null rate      = #(valid queries whose whole row is 0) / #(valid queries)
* row mass       = the sum of a valid query's weights over its valid keys: 1 for the normalised functions, the share
  of the values that reaches the output for sigmoid, ReLU/n and softmax+null (whose null key takes the rest), 0 for
  a null row; reported as its mean, a histogram (MASS_BINS) and the
* near-null rate = #(valid queries whose row mass is below NEAR_NULL_MASS) / #(valid queries): a soft "switch-off"
  (sigmoid, the null slot) beside ReLA's exact one. ReLA's weights are not normalised (its norm rescales the output
  after them), so for ReLA only the exact null rate says "off"; its row mass is reported all the same.
* JS diversity   = Entropy(mean_h p_h) - mean_h Entropy(p_h) per query over the H heads of a layer (the generalised
  Jensen-Shannon divergence of Correia et al. 2019), averaged over queries, in nats (natural logarithm; divide by
  ln 2 for bits). ReLA rows are renormalised to sum to 1; null heads are left out and a query with fewer than two
  live heads is skipped. The variant that keeps null heads as uniform distributions is reported beside it.

Only sums are kept between batches, so memory does not grow with the test set.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ..attention_types import ATTENTION_TYPES
from . import MASS_BINS, NEAR_NULL_MASS

LOG_BASE = "e (nats)"


def valid_pairs(query_valid: torch.Tensor, key_valid: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """[B, T, S] bool: both positions are real tokens (and key <= query when causal)."""
    pairs = query_valid[:, :, None] & key_valid[:, None, :]
    if causal:
        t, s = pairs.shape[1:]
        pairs = pairs & torch.ones(t, s, dtype=torch.bool, device=pairs.device).tril()
    return pairs


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(dim)


def js_per_query(weights: torch.Tensor, pairs: torch.Tensor,
                 keep_null_as_uniform: bool = False) -> tuple[torch.Tensor, int]:
    """Generalised JS divergence over heads for each valid query.

    weights [B, H, T, S] (non-negative), pairs [B, T, S] valid pairs. Returns (js [N], used queries N) for the queries
    with at least two live heads (all heads when ``keep_null_as_uniform``)."""
    w = weights.double() * pairs[:, None].double()
    mass = w.sum(-1)  # [B, H, T]
    live = mass > 0
    n_keys = pairs.sum(-1).clamp(min=1).double()  # [B, T]
    p = w / mass.clamp(min=torch.finfo(torch.float64).tiny)[..., None]
    if keep_null_as_uniform:
        uniform = pairs[:, None].double() / n_keys[:, None, :, None]
        p = torch.where(live[..., None], p, uniform)
        live = torch.ones_like(live)
    n_live = live.sum(1)  # [B, T]
    query_valid = pairs.any(-1)
    use = query_valid & (n_live >= 2)
    p = p * live[..., None]
    mean = p.sum(1) / n_live.clamp(min=1)[..., None]  # [B, T, S]
    js = entropy(mean) - entropy(p).sum(1) / n_live.clamp(min=1)  # [B, T]
    return js[use], int(use.sum())


class AttentionStats:
    """Running sums for one model: per attention type, layer and head."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, int], dict[str, Any]] = {}  # (type, layer) -> running sums

    def _slot(self, attention_type: str, layer: int, heads: int) -> dict[str, Any]:
        key = (attention_type, layer)
        if key not in self.sums:
            self.sums[key] = {
                "pairs": torch.zeros(heads, dtype=torch.float64),
                "zero_pairs": torch.zeros(heads, dtype=torch.float64),
                "queries": torch.zeros(heads, dtype=torch.float64),
                "null_queries": torch.zeros(heads, dtype=torch.float64),
                "near_null_queries": torch.zeros(heads, dtype=torch.float64),
                "mass_sum": torch.zeros(heads, dtype=torch.float64),
                "mass_counts": torch.zeros(len(MASS_BINS), dtype=torch.float64),
                "js_sum": 0.0, "js_queries": 0, "js_uniform_sum": 0.0, "js_uniform_queries": 0,
            }
        return self.sums[key]

    def add(self, attention_type: str, layer: int, weights: torch.Tensor, pairs: torch.Tensor) -> None:
        """weights [B, H, T, S] pre-dropout; pairs [B, T, S] valid (query, key) pairs."""
        weights = weights.float()
        heads = weights.size(1)
        slot = self._slot(attention_type, layer, heads)
        valid = pairs[:, None].expand_as(weights)
        slot["pairs"] += valid.sum((0, 2, 3)).double()
        slot["zero_pairs"] += ((weights == 0) & valid).sum((0, 2, 3)).double()
        query_valid = pairs.any(-1)  # [B, T]
        row_live = ((weights != 0) & valid).any(-1)  # [B, H, T]
        slot["queries"] += query_valid.sum().double().expand(heads)
        slot["null_queries"] += ((~row_live) & query_valid[:, None]).sum((0, 2)).double()
        mass = (weights.double() * valid).sum(-1)  # [B, H, T]
        counted = query_valid[:, None].expand_as(mass)
        slot["near_null_queries"] += ((mass < NEAR_NULL_MASS) & counted).sum((0, 2)).double()
        slot["mass_sum"] += (mass * counted).sum((0, 2))
        edges = torch.tensor(MASS_BINS[1:], dtype=torch.float64, device=mass.device)
        bins = torch.bucketize(mass[counted], edges, right=True)  # i: MASS_BINS[i] <= mass < MASS_BINS[i + 1]
        slot["mass_counts"] += torch.bincount(bins, minlength=len(MASS_BINS)).double().cpu()
        js, n = js_per_query(weights, pairs)
        slot["js_sum"] += float(js.sum())
        slot["js_queries"] += n
        js_u, n_u = js_per_query(weights, pairs, keep_null_as_uniform=True)
        slot["js_uniform_sum"] += float(js_u.sum())
        slot["js_uniform_queries"] += n_u

    def summary(self) -> dict[str, Any]:
        """Nested dict: {type: {overall: {...}, layers: [{layer, sparsity, null_rate, js, heads: [...]}, ...]}}."""
        out: dict[str, Any] = {"log_base": LOG_BASE, "near_null_mass": NEAR_NULL_MASS, "types": {}}
        for attention_type in (t.name for t in ATTENTION_TYPES):
            layers = sorted(layer for k, layer in self.sums if k == attention_type)
            if not layers:
                continue
            rows: list[dict[str, Any]] = []
            total: dict[str, Any] = {"pairs": 0.0, "zero_pairs": 0.0, "queries": 0.0, "null_queries": 0.0,
                                     "near_null_queries": 0.0, "mass_sum": 0.0, "js_sum": 0.0, "js_queries": 0,
                                     "mass_counts": torch.zeros(len(MASS_BINS), dtype=torch.float64)}
            for layer in layers:
                s = self.sums[(attention_type, layer)]
                heads = [{"head": h, "sparsity": _ratio(s["zero_pairs"][h], s["pairs"][h]),
                          "null_rate": _ratio(s["null_queries"][h], s["queries"][h]),
                          "near_null_rate": _ratio(s["near_null_queries"][h], s["queries"][h]),
                          "mass": _ratio(s["mass_sum"][h], s["queries"][h])}
                         for h in range(len(s["pairs"]))]
                rows.append({
                    "layer": layer,
                    "sparsity": _ratio(s["zero_pairs"].sum(), s["pairs"].sum()),
                    "null_rate": _ratio(s["null_queries"].sum(), s["queries"].sum()),
                    "near_null_rate": _ratio(s["near_null_queries"].sum(), s["queries"].sum()),
                    "mass": _ratio(s["mass_sum"].sum(), s["queries"].sum()),
                    "js": _ratio(s["js_sum"], s["js_queries"]),
                    "js_queries": s["js_queries"],
                    "js_null_as_uniform": _ratio(s["js_uniform_sum"], s["js_uniform_queries"]),
                    "heads": heads,
                })
                for key in ("pairs", "zero_pairs", "queries", "null_queries", "near_null_queries", "mass_sum"):
                    total[key] += float(s[key].sum())
                total["mass_counts"] += s["mass_counts"]
                total["js_sum"] += s["js_sum"]
                total["js_queries"] += s["js_queries"]
            out["types"][attention_type] = {
                "overall": {"sparsity": _ratio(total["zero_pairs"], total["pairs"]),
                            "null_rate": _ratio(total["null_queries"], total["queries"]),
                            "near_null_rate": _ratio(total["near_null_queries"], total["queries"]),
                            "mass": _ratio(total["mass_sum"], total["queries"]),
                            # queries (all heads) per bin: MASS_BINS[i] <= row mass < MASS_BINS[i + 1]
                            "mass_histogram": {"edges": list(MASS_BINS),
                                               "queries": [int(c) for c in total["mass_counts"].tolist()]},
                            "js": _ratio(total["js_sum"], total["js_queries"]),
                            "valid_pairs": int(total["pairs"])},
                "layers": rows,
            }
        all_pairs = sum(t["overall"]["valid_pairs"] for t in out["types"].values())
        zero = sum(t["overall"]["sparsity"] * t["overall"]["valid_pairs"] for t in out["types"].values()
                   if t["overall"]["sparsity"] is not None)
        out["overall_sparsity"] = zero / all_pairs if all_pairs else None
        return out


def _ratio(num: Union[float, torch.Tensor], den: Union[float, torch.Tensor]) -> Optional[float]:
    num, den = float(num), float(den)
    return num / den if den else None
