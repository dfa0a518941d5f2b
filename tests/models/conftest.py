"""Fixtures of the models tests; the tiny models themselves live in ``_tiny_models``."""

import pytest

from models import ARCHS


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param
