"""Token sampling and classifier-free-guidance schedules. All randomness comes from the given generator."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from utils.config import ConfigError

# Sampling defaults of the official release (keyword arguments of StarPipeline.__call__). A pipeline directory
# may record its own in config.json ("generation", written from the training config's star_train.sample_*).
OFFICIAL_GENERATION = {"cfg": 4.0, "top_k": 900, "top_p": 0.95, "guidance_schedule": "linear"}


def guidance_weights(schedule: str | list[float], cfg: float, num_scales: int) -> list[float]:
    """Guidance weight t_s per scale (logits = (1+t) cond - t uncond).

    ``"linear"``: the official ramp t_s = cfg * s / (S-1); ``"constant"``: t_s = cfg;
    ``"window:i:j"``: t_s = cfg on scales i..j (inclusive, 0 <= i <= j < S), 0 elsewhere; a list, or its text
    ``"t0,t1,..."`` (command lines, configs): explicit t_s per scale.
    """
    S = num_scales
    if isinstance(schedule, str) and "," in schedule:
        try:
            schedule = [float(t) for t in schedule.split(",")]
        except ValueError:
            raise ConfigError(f"an explicit guidance list is numbers separated by commas, got {schedule!r}") from None
    if isinstance(schedule, (list, tuple)):
        if len(schedule) != S:
            raise ConfigError(f"explicit guidance list needs {S} values (one per scale), got {len(schedule)}")
        if not all(math.isfinite(float(t)) for t in schedule):
            raise ConfigError(f"explicit guidance weights must be finite numbers, got {list(schedule)}")
        return [float(t) for t in schedule]
    if schedule == "linear":
        return [cfg * si / (S - 1) if S > 1 else cfg for si in range(S)]
    if schedule == "constant":
        return [float(cfg)] * S
    if schedule.startswith("window:"):
        try:
            lo, hi = (int(v) for v in schedule.split(":")[1:])
        except ValueError:
            raise ConfigError(f"guidance window must look like 'window:i:j', got {schedule!r}") from None
        if not 0 <= lo <= hi < S:  # an empty or out-of-range window would silently guide nothing (or less)
            raise ConfigError(f"guidance {schedule!r}: the window needs 0 <= i <= j <= {S - 1} "
                              f"(this model has {S} scales)")
        return [float(cfg) if lo <= si <= hi else 0.0 for si in range(S)]
    raise ConfigError(f"unknown guidance schedule {schedule!r}: use 'linear', 'constant', 'window:i:j' or a list "
                      "'t0,t1,...' (one weight per scale)")


def check_sampling(cfg: float, top_k: int, top_p: float) -> None:
    """Refuse sampling settings that would fail deep inside generation (or silently mean nothing)."""
    if not math.isfinite(cfg):
        raise ConfigError(f"cfg must be a finite number, got {cfg}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0: the whole vocabulary), got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ConfigError(f"top_p must lie in [0, 1] (0: off), got {top_p}")


# One generator for the whole batch (the official way), or one per equal group of consecutive rows (the images of
# one prompt): then an image's random numbers do not depend on what else is in the batch.
Generators = torch.Generator | Sequence[torch.Generator] | None


def draw_per_group(generator: Generators, rows: int,
                   draw: Callable[[torch.Generator | None, int, int], torch.Tensor]) -> torch.Tensor:
    """``draw(g, begin, end)`` returns random values for rows begin..end-1. One generator (or None) draws all
    rows in one call; a list of G generators draws rows i*rows/G .. (i+1)*rows/G - 1 with generator i, so a
    group drawn in a batch gets the same numbers as when it is the whole batch."""
    if generator is None or isinstance(generator, torch.Generator):
        return draw(generator, 0, rows)
    if not generator or rows % len(generator):
        raise ValueError(f"{len(generator)} generators for {rows} rows: give one per equal group of rows")
    n = rows // len(generator)
    return torch.cat([draw(g, i * n, (i + 1) * n) for i, g in enumerate(generator)])


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask logits (..., V) outside the top-k (ties kept) and then outside the nucleus top-p; returns a copy.

    Same rule as the official sampler: top-p drops the tokens whose ascending cumulative probability is
    <= 1 - top_p, always keeping the most likely one.
    """
    logits = logits.clone()
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                  generator: Generators = None, return_prob: bool = False):
    """Sample one token per position from (B, l, V) logits: (B, l) indices (and their probabilities).

    One ``torch.multinomial`` call over all B*l rows per generator, consuming a single generator exactly as the
    official code.
    """
    B, n, V = logits.shape
    probs = filter_top_k_top_p(logits, top_k, top_p).softmax(dim=-1)
    idx = draw_per_group(generator, B, lambda g, a, b: torch.multinomial(
        probs[a:b].reshape(-1, V), num_samples=1, replacement=True, generator=g).view(b - a, n))
    if return_prob:
        return idx, probs.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    return idx
