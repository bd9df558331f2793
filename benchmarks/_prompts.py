"""Inputs shared by fnattr's benchmarks and the peer script (no fnattr import here)."""

PROMPT = ("Write one sentence about the long history of Paris, the capital city of France, "
          "and its famous river")  # 20 tokens for SmolLM2 (printed by the benchmarks)
TARGET = (" The Seine flows through Paris, which grew from a small Roman town into the "
          "great capital of France")  # 20 tokens
PROMPTS = [
    "The capital of France is", "Water boils at a temperature of",
    "The largest planet in our solar system is", "Shakespeare wrote the play",
    "The chemical symbol for gold is", "The first man on the moon was",
    "The tallest mountain on Earth is", "Python is a programming language that",
]
