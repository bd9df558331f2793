"""Evaluate attributions: faithfulness (remove the top tokens and watch the target), method
comparisons with bootstrap intervals, and the model-randomisation sanity check.

`faithfulness` scores one result; `compare` runs several methods over examples and tabulates them
(`compare_files`, `compare_result`, `compare_views`: its files, numbers and pictures); `ranking`
and `removal` are the shared steps (which tokens go first, and the forwards of the removal copies);
`results` holds `Faithfulness` and its safetensors files; `sanity` is the randomisation check.
"""

from fnattr.evaluate.metrics import (
    FRACTIONS as FRACTIONS,
    HIGHER_IS_BETTER as HIGHER_IS_BETTER,
    METRICS as METRICS,
    REMOVALS as REMOVALS,
    Faithfulness as Faithfulness,
    comprehensiveness as comprehensiveness,
    deletion as deletion,
    faithfulness as faithfulness,
    insertion as insertion,
    load as load,
    save as save,
    sufficiency as sufficiency,
)

__all__ = ["FRACTIONS", "HIGHER_IS_BETTER", "METRICS", "Faithfulness", "comprehensiveness",
           "deletion", "faithfulness", "insertion", "load", "save", "sufficiency"]
