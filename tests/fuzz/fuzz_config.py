"""Coverage-guided fuzzing (atheris, libFuzzer) of the config loader: whatever the bytes,
`lb.config.parse_config` gives a Config or raises ConfigError with at least one problem,
which renders and crosses a process boundary (lb.loader pickles it); anything else
escaping, or a problem without a message, is a bug. And differentially: a Config read by
the plain fast path is the one the full, located read gives.

    python -m tests.fuzz.fuzz_config NEW_DIR tests/fuzz/corpus/config -dict=tests/fuzz/config.dict

(from the repository root; libFuzzer writes what it finds to the first directory).
tests/fuzz/test_fuzz.py runs it for a bounded time."""

from __future__ import annotations

import pickle
import sys

import atheris

with atheris.instrument_imports(include=["lb"]):
    from lb.config import ConfigError, _parse_located, parse_config


def one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        config = parse_config(text, "fuzz.yaml")
    except ConfigError as e:
        assert e.problems, "a ConfigError without a problem"
        assert all(p.message for p in e.problems), e.problems
        again = pickle.loads(pickle.dumps(e))
        assert again.render() == e.render()
    else:
        assert _parse_located(text, "fuzz.yaml") == config


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
