"""Evaluation: Fréchet distance between feature statistics and the digits self-grader."""
from dit_jax.eval.digits import DigitsGrader
from dit_jax.eval.frechet import frechet_distance, gaussian_stats

__all__ = [
    "DigitsGrader",
    "frechet_distance",
    "gaussian_stats",
]
