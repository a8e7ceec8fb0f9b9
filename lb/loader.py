"""Load a config file in a child process, within a time and a memory budget.

`lb run` serves while it reloads: the parse of whatever file SIGHUP points at must not
hold the event loop (libyaml and pydantic run in C, holding the GIL, so a thread would
not do), nor eat the host's memory, nor outlive a SIGTERM. The child loads the file with
`lb.config.load_config`, under an address-space limit, and sends back the pickled Config
or ConfigError; past the time budget it is killed and the reload refused.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import resource
import sys
from pathlib import Path

from lb.config import ConfigError, Problem, load_config
from lb.model import Config

#: How long a reload may take to load its file (10,000 services load in seconds).
RELOAD_BUDGET = 60.0
#: The child's address space: a bounded parse of the largest file allowed fits well within.
MEMORY_BUDGET = 4 * 1024**3

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


async def load_isolated(path: Path, budget: float = RELOAD_BUDGET) -> Config:
    """`load_config(path)` in a child process: the Config, or ConfigError (a bad file, a
    file that takes longer than `budget`, or a child that died)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lb.loader",
        str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), budget)
    except TimeoutError:
        raise ConfigError(
            str(path), [Problem((), f"loading took longer than {budget:g}s: refused")]
        ) from None
    finally:
        if proc.returncode is None:  # timed out, or the reload was cancelled (SIGTERM)
            proc.kill()
            await proc.wait()
    if proc.returncode != 0 or not out:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
        reason = last[0] or f"exit code {proc.returncode}"
        raise ConfigError(str(path), [Problem((), f"loading failed: {reason}")])
    result = pickle.loads(out)
    if isinstance(result, ConfigError):
        raise result
    assert isinstance(result, Config)
    return result


def main() -> int:
    """The child: load argv[1], write the pickled result to stdout."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BUDGET, MEMORY_BUDGET))
    result: Config | ConfigError
    try:
        result = load_config(sys.argv[1])
    except ConfigError as e:
        result = e
    except MemoryError:
        result = ConfigError(
            sys.argv[1], [Problem((), f"loading needs more than {MEMORY_BUDGET >> 30} GiB")]
        )
    sys.stdout.buffer.write(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    return 0


if __name__ == "__main__":
    sys.exit(main())
