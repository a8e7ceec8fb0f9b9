"""Coverage-guided fuzzing (atheris, libFuzzer) of the PROXY protocol header parser:
whatever the bytes, `lb.proxy_header.parse` returns a header, None (a valid beginning:
read more), or raises ProxyHeaderError, and nothing else. Fed one byte at a time it
decides the same, and never later than the whole input did; a header it accepts encodes
back to one that parses to the same addresses.

    python -m tests.fuzz.fuzz_proxy_header NEW_DIR tests/fuzz/corpus/proxy_header -dict=tests/fuzz/proxy_header.dict

tests/fuzz/test_fuzz.py runs it for a bounded time."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["lb"]):
    from lb.proxy_header import MAX_HEADER, ProxyHeader, ProxyHeaderError, encode, parse


def outcome(data: bytes) -> ProxyHeader | str | None:
    try:
        return parse(data)
    except ProxyHeaderError as e:
        assert str(e), "an error without a reason"
        return "error"


def one_input(data: bytes) -> None:
    whole = outcome(data)
    if whole is None:
        assert len(data) < MAX_HEADER, "undecided past MAX_HEADER bytes"
    for end in range(len(data)):  # a reader that gets the bytes in pieces
        part = outcome(data[:end])
        if part is not None:  # decided on a prefix: the same as on the whole
            assert part == whole, (end, part, whole)
            break
    if isinstance(whole, ProxyHeader):
        assert 0 < whole.length <= len(data)
        again = parse(encode(whole.version, whole.source, whole.dest))
        assert again is not None and (again.source, again.dest) == (whole.source, whole.dest)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
