"""The colours and shapes of the synthetic data's images and drawings (a leaf: the data config checks
``data.generation_holdout`` against them without importing the synthetic dataset)."""

COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95), "yellow": (0.95, 0.9, 0.1)}
SHAPES = ("square", "circle", "cross", "ring")
