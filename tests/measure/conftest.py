import pytest

from measure.matrix import load_matrix, to_run


@pytest.fixture(scope="session")
def ci_matrix():
    return load_matrix("ci")


@pytest.fixture(scope="session")
def tiny(ci_matrix):
    """tiny(name, **settings) -> Run for one of the ci matrix's tiny models."""

    def make(model, **settings):
        return to_run({"model": model, **settings}, ci_matrix["models"])

    return make
