"""Load a config file in a child process, within a time and a memory budget.

`lb run` serves while it reloads: the parse of whatever file SIGHUP points at must not
hold the event loop (libyaml and pydantic run in C, holding the GIL, so a thread would
not do), nor eat the host's memory, nor outlive a SIGTERM. A forked child (it has every
module loaded already: a fresh interpreter would spend seconds importing, minutes under
the kernel tier's emulated CPU) loads the file with `lb.config.load_config` under an
address-space limit, sends back the pickled Config or ConfigError through a pipe and
exits; past the time budget it is killed and the reload refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import resource
import signal
from pathlib import Path

from lb.config import ConfigError, Problem, load_config
from lb.model import Config

#: How long a reload may take to load its file (10,000 services load in seconds).
RELOAD_BUDGET = 60.0
#: The child's memory beyond what it shares with lb: a bounded parse of the largest
#: file allowed fits well within.
MEMORY_BUDGET = 4 * 1024**3


async def load_isolated(path: Path, budget: float = RELOAD_BUDGET) -> Config:
    """`load_config(path)` in a child process: the Config, or ConfigError (a bad file, a
    file that takes longer than `budget`, or a child that died)."""
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no event loop, no other thread; never returns
        os.close(read_fd)
        _child(str(path), write_fd)
    os.close(write_fd)
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
    )
    try:
        data = await asyncio.wait_for(reader.read(), budget)
    except TimeoutError:
        raise ConfigError(
            str(path), [Problem((), f"loading took longer than {budget:g}s: refused")]
        ) from None
    finally:  # done, timed out, or the reload was cancelled (SIGTERM): no child outlives it
        transport.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        status = (await loop.run_in_executor(None, os.waitpid, pid, 0))[1]
    try:
        result = pickle.loads(data)
    except Exception:
        code = os.waitstatus_to_exitcode(status)
        raise ConfigError(
            str(path), [Problem((), f"loading failed (the loader exited with {code})")]
        ) from None
    if isinstance(result, ConfigError):
        raise result
    assert isinstance(result, Config)
    return result


def _child(path: str, out: int) -> None:
    """Load `path`, write the pickled result to `out`, exit without running anything of
    the parent's (no atexit, no buffered output, no signal handler of lb's)."""
    code = 0
    try:
        signal.set_wakeup_fd(-1)  # the event loop's: a signal here must not reach lb's loop
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        pages = int(Path("/proc/self/statm").read_text().split()[0])
        limit = pages * os.sysconf("SC_PAGE_SIZE") + MEMORY_BUDGET
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        result: Config | ConfigError
        try:
            result = load_config(path)
        except ConfigError as e:
            result = e
        except MemoryError:
            result = ConfigError(
                path, [Problem((), f"loading needs more than {MEMORY_BUDGET >> 30} GiB")]
            )
        data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(data)
        while view:
            view = view[os.write(out, view) :]
    except BaseException:
        code = 1
    finally:
        os._exit(code)
