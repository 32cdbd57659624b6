
import os as _os

# `make test-all` (TOKAX_TEST_ALL=1) also runs the real-model checks that `make test` leaves to
# cheaper equivalents, to keep CI within its time (each names what covers it by default).
RUN_ALL = _os.environ.get("TOKAX_TEST_ALL", "") not in ("", "0")
