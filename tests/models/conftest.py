"""Fixtures of the models tests; the tiny models themselves live in ``tests/_tiny.py``."""

import pytest

from models import ARCHS


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param
