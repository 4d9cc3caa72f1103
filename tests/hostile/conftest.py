"""The real in-process stack the integration tests use, shared here rather than built twice."""

from tests.integration.conftest import stack

__all__ = ["stack"]
