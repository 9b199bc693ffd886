"""The measurement matrices' tiny models (the [models.X] tables of measure/matrices/*.toml) as specs,
for the tests that hold the calculator to traced rows. A registry name passes through load_spec."""

import tomllib
from functools import lru_cache
from pathlib import Path

from peftcalc.config import load_spec

MATRICES = Path(__file__).parents[3] / "measure" / "matrices"


@lru_cache(maxsize=None)
def matrix_models(matrix: str = "ci") -> dict:
    """The [models.X] tables of measure/matrices/<matrix>.toml, by name."""
    return tomllib.loads((MATRICES / f"{matrix}.toml").read_text())["models"]


def matrix_spec(name: str, matrix: str = "ci"):
    """The ModelSpec of a matrix's tiny model, or of a registry model when the matrix has no such table."""
    models = matrix_models(matrix)
    return load_spec({**models[name], "_name_or_path": name} if name in models else name)
