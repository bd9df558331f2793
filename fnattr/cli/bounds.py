"""The value ranges the methods document for their numeric options, checked by the command line
before a model loads (the methods check them again, after it has)."""

import math
from typing import Any

# option: (low, high, low inclusive, high inclusive, in words); any method that takes the option
BOUNDS: dict[str, tuple[float, float, bool, bool, str]] = {
    "window": (1, math.inf, True, False, "an integer >= 1"),
    "stride": (1, math.inf, True, False, "an integer >= 1"),
    "n_steps": (1, math.inf, True, False, "an integer >= 1"),
    "max_steps": (1, math.inf, True, False, "an integer >= 1"),
    "max_points_per_segment": (1, math.inf, True, False, "an integer >= 1"),
    "points_per_segment": (1, math.inf, True, False, "an integer >= 1 or 'auto'"),
    "n_neighbors": (1, math.inf, True, False, "an integer >= 1"),
    "n_samples": (1, math.inf, True, False, "an integer >= 1"),
    "internal_batch_size": (1, math.inf, True, False, "an integer >= 1"),
    "num_probes": (1, math.inf, True, False, "an integer >= 1"),
    "keep_top_n": (1, math.inf, True, False, "an integer >= 1"),
    "max_probe_steps": (1, math.inf, True, False, "an integer >= 1"),
    "stopping_condition_top_k": (1, math.inf, True, False, "an integer >= 1"),
    "tolerance": (0, math.inf, False, False, "a number > 0"),
    "keep_prob": (0, 1, False, False, "a number in (0, 1)"),
    "kernel_width": (0, math.inf, False, False, "a finite number > 0"),
    "alpha": (0, math.inf, True, False, "a finite number >= 0"),
    "replacing_ratio": (0, 1, False, False, "a number in (0, 1)"),
    "stdevs": (0, math.inf, True, False, "a finite number >= 0"),
}
# where a method documents a tighter bound than the shared one
METHOD_BOUNDS = {("lime", "n_samples"): (2, math.inf, True, False,
                                         "an integer >= 2 (sample 0 is the input)")}


def out_of_range(method: str, name: str, value: Any) -> str | None:
    """What `value` of option `name` should be, where it is outside the documented range."""
    bound = METHOD_BOUNDS.get((method, name)) or BOUNDS.get(name)
    if bound is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, high, low_in, high_in, words = bound
    ok = (value >= low if low_in else value > low) and (value <= high if high_in else value < high)
    return None if ok and not math.isnan(value) else words
