"""Test and benchmark support code (real tiny models, PEFT oracles, adapter training); not shipped.

Tests import it as ``support.models`` (pytest puts ``tests/`` on ``sys.path`` through its rootdir
conftest); benchmarks and the local stack add ``tests/`` to ``sys.path`` themselves."""
