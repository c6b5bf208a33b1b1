"""DAPO's data handling (Yu et al. 2025, arXiv 2503.14476), as verl's DAPO recipe defines it.

* ``overlong_penalty``: soft overlong punishment, added to the task reward
  (``algorithm.overlong_buffer``, ``algorithm.overlong_penalty_factor``).
* ``keep_groups``: dynamic sampling's filter; a group whose task rewards are all equal has zero
  advantage for every sample and is dropped (``algorithm.filter_groups``). The trainer's
  ``generate_batch`` generates more prompts until the rollout batch is full.
* ``mask_truncated``: overlong filtering; a response cut at ``rollout.max_new_tokens`` adds no
  gradient (``algorithm.mask_truncated``).

docs/DAPO.md describes the options and their metrics.
"""

from __future__ import annotations

import math

TRUNCATED = "length"  # the finish reason of a response cut at max_new_tokens (SGLang's)


def overlong_penalty(response_len: int, max_new_tokens: int, buffer: int, factor: float) -> float:
    """DAPO's soft overlong punishment: 0 up to ``max_new_tokens - buffer`` response tokens, then
    falling linearly to ``-factor`` at ``max_new_tokens``::

        min(-(response_len - (max_new_tokens - buffer)) / buffer * factor, 0)

    (verl's DAPORewardManager). ``buffer`` 0 turns it off. The response length counts every
    generated token, EOS included, as ``max_new_tokens`` does."""
    if isinstance(buffer, bool) or not isinstance(buffer, int) or not 0 <= buffer < max_new_tokens:
        raise ValueError(f"algorithm.overlong_buffer = {buffer!r} must be an integer in [0, rollout.max_new_tokens = "
                         f"{max_new_tokens})")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 0):
        raise ValueError(f"algorithm.overlong_penalty_factor = {factor!r} must be a finite number >= 0")
    if not 0 <= response_len <= max_new_tokens:
        # the engine never returns more than it was allowed: a longer response is a broken engine
        raise ValueError(f"a response of {response_len} tokens: must lie in [0, rollout.max_new_tokens = "
                         f"{max_new_tokens}]")
    if buffer == 0:
        return 0.0
    excess = response_len - (max_new_tokens - buffer)
    return -excess / buffer * factor if excess > 0 else 0.0  # not -0.0 in the logs


def keep_groups(rewards, group_size: int) -> list[bool]:
    """Per group of ``group_size`` consecutive rewards: True when they are not all equal.

    The trainer passes the task rewards, before the overlong penalty: DAPO's recipe filters on
    the answer's accuracy (``filter_groups.metric=acc``), and the penalty alone would keep groups
    that are all wrong (or all right) and differ only in length, whose whole signal is "be
    shorter". Exact equality, not std > 0: the std of equal floats can round above 0."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group size {group_size!r}: groups of fewer than 2 samples have nothing to compare")
    values = [float(r) for r in rewards]
    if len(values) % group_size:
        raise ValueError(f"{len(values)} rewards do not split into groups of {group_size}")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"rewards must be finite; sample(s) {bad[:5]} are not")
    groups = [values[i:i + group_size] for i in range(0, len(values), group_size)]
    return [min(g) != max(g) for g in groups]


def mask_truncated(samples, rollouts) -> float:
    """Set ``trained = False`` on each sample whose rollout finished by length (cut at
    ``rollout.max_new_tokens``); the loss then gives it no gradient and leaves it out of its
    normaliser. Returns the fraction masked. Advantages are not touched: they were computed from
    every reward of the group, truncated samples' included, as in DAPO."""
    if len(samples) != len(rollouts):
        raise ValueError(f"{len(samples)} samples for {len(rollouts)} rollouts")
    if not samples:
        return 0.0
    masked = 0
    for sample, rollout in zip(samples, rollouts):
        if rollout.finish_reason == TRUNCATED:
            sample.trained = False
            masked += 1
    return masked / len(samples)
