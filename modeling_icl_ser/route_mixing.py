"""How `classify` mixes its routes' probabilities (`IclSerConfig.route_weights`).

eval.py, train.py and evaluation/ mix the routes that `classify(..., return_routes=True)` returns
with the same function, so a mixture chosen there is the one the model computes.
"""

from typing import Optional

import torch


def mix_routes(routes: dict, weights: Optional[dict], weights_without_enrollment: Optional[dict] = None) -> torch.Tensor:
    """`classify`'s mixture: `routes` maps "lm", "si", "prototype" to `(B, C)` probabilities (the
    prototype's rows are NaN where a sample has no enrollment), `weights` to their weights
    (`IclSerConfig.route_weights`; None = the LM alone). Each row mixes the routes it has, with
    the weights renormalized over them; rows without enrollment use `weights_without_enrollment`
    instead when given (`IclSerConfig.route_weights_without_enrollment`)."""
    if weights_without_enrollment is not None:
        prototype = routes.get("prototype")
        enrolled = (torch.zeros(routes["lm"].shape[0], 1, dtype=torch.bool, device=routes["lm"].device)
                    if prototype is None else ~torch.isnan(prototype).any(-1, keepdim=True))
        return torch.where(enrolled, mix_routes(routes, weights), mix_routes(routes, weights_without_enrollment))
    if not weights:
        return routes["lm"]
    total = torch.zeros_like(routes["lm"], dtype=torch.float32)
    norm = torch.zeros(routes["lm"].shape[0], 1, device=total.device)
    for name, weight in weights.items():
        probs = routes.get(name)
        if probs is None or float(weight) == 0:
            continue
        has = ~torch.isnan(probs).any(-1, keepdim=True)
        total = total + float(weight) * torch.nan_to_num(probs.float()) * has
        norm = norm + float(weight) * has
    # A row with none of the weighted routes (e.g. prototype only, K = 0) falls back to the LM.
    return torch.where(norm > 0, total / norm.clamp_min(1e-12), routes["lm"].float())


def weights_for_k(weights_by_k: dict, k: int) -> Optional[dict]:
    """The weights a sample with `k` enrollment utterances uses (`IclSerConfig.route_weights_by_k`):
    those of the largest chosen K that is <= k (K = 3 uses K = 2's, K = 16 uses K = 8's); None
    when no chosen K is <= k."""
    chosen = sorted((int(key), value) for key, value in weights_by_k.items() if int(key) <= k)
    return dict(chosen[-1][1]) if chosen else None


def mix_routes_by_k(routes: dict, weights_by_k: dict, enrollment_sizes: torch.Tensor) -> torch.Tensor:
    """`mix_routes` with each row's weights looked up by its enrollment size (`(B,)` K per row)."""
    out = torch.zeros_like(routes["lm"], dtype=torch.float32)
    for k in enrollment_sizes.unique().tolist():
        rows = enrollment_sizes == k
        part = {name: None if value is None else value[rows] for name, value in routes.items()}
        out[rows] = mix_routes(part, weights_for_k(weights_by_k, int(k))).float()
    return out


__all__ = ["mix_routes", "mix_routes_by_k", "weights_for_k"]
