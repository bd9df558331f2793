"""Defaults that the Python API and the command line share (one place, so they cannot drift)."""

# `fnattr.attribute(...)` and `fnattr attribute`: integrated gradients, refined per step until
# its completeness error is within 5% (`n_steps="auto"`), with a neutral baseline ("auto").
METHOD = "integrated_gradients"
MAX_NEW_TOKENS = 8
TARGET_FN = "probability"
