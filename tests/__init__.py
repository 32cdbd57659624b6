import os as _os

import pytest as _pytest

# `make test-all` (TOKAX_TEST_ALL=1) also runs the real-model checks that `make test` leaves to
# cheaper equivalents, to keep CI within its time (each names what covers it by default).
RUN_ALL = _os.environ.get("TOKAX_TEST_ALL", "") not in ("", "0")


def all_only(covered_by: str):
    """Skip unless TOKAX_TEST_ALL=1; ``covered_by`` says what checks the same in `make test`."""
    return _pytest.mark.skipif(not RUN_ALL, reason=f"TOKAX_TEST_ALL=1 only: make test covers it by {covered_by}")
