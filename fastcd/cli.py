"""The `fastcd` command. Each subcommand lives in its own module, imported only when used,
so a library that fails to import (say DALI) breaks only the commands that need it.

A subcommand module defines `add_arguments(parser)` and `run(args) -> int`.

kernels/, data_prep/ and bench/ import as fastcd.kernels, fastcd.data_prep and fastcd.bench only once fastcd is
installed (setup.py's package_dir); run from a checkout that is not, a command that needs one says so in a line.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

from fastcd.errors import FastcdError, Terminated
from fastcd.utils import lifeline

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("fastcd.commands.train", "train a student (optionally distilled) from a YAML config"),
    "eval": ("fastcd.commands.evaluate", "top-1/top-5 error of a checkpoint on the validation split"),
    "prepare": ("fastcd.data_prep.cli", "convert a dataset into FFCV and DALI formats (offline, once)"),
    "demo": ("fastcd.commands.demo", "the main job: teacher, student alone and CD+GKD+EDT on Fashion-MNIST"),
    "repro": ("fastcd.commands.repro", "accuracy reproduction of the seed's table on real data"),
    "cache-teacher": ("fastcd.commands.cache_teacher", "store the teacher's targets for a config's crops once, "
                      "so training runs no teacher (teacher.cache)"),
    "configs": ("fastcd.commands.configs", "list the shipped experiment configs, one line each"),
}
BENCHES: dict[str, tuple[str, str]] = {
    "prepare": ("fastcd.bench.prepare", "dataset conversion: FFCV writer vs shard writer vs both"),
    "loader": ("fastcd.bench.loader", "images/s of each loader backend vs the raw libraries"),
    "feed": ("fastcd.bench.feed", "the host side of the GPU feed alone, per core, vs the per-sample path"),
    "kernels": ("fastcd.bench.kernels", "fused distillation-loss kernels vs eager and torch.compile"),
    "train": ("fastcd.bench.train", "images/s of the full distillation step, with an ablation of knobs"),
    "scale": ("fastcd.bench.scale", "the full-size rehearsal: every stage at 1/100, 1/10 and ImageNet's size"),
}


MAPPED = ("fastcd.kernels", "fastcd.data_prep", "fastcd.bench")  # folders that import under fastcd once installed
NOT_INSTALLED = ("fastcd is not installed: kernels/, data_prep/ and bench/ import as fastcd.kernels, fastcd.data_prep "
                 "and fastcd.bench only through the install; run `make setup` (or `pip install -e .`) in the checkout")


def _usage(table: dict[str, tuple[str, str]], prog: str) -> str:
    width = max(len(k) for k in table)
    lines = [f"usage: {prog} [--version] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in table.items()]
    return "\n".join(lines)


def _run_module(module_name: str, prog: str, argv: list[str]) -> int:
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=prog, description=module.__doc__)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv)) or 0)


def _error_line(text: str) -> None:
    """One line on stderr in one write, so the ranks of a distributed run never interleave theirs."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a command runs, SIGTERM raises `Terminated` (in the main thread: signals are delivered there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _stopped(prog: str, name: str, what: str, e: BaseException) -> None:
    """The one line of a command stopped by a signal, with what the command added (e.g. its last checkpoint)."""
    _error_line(f"{prog} {name}: {what}{'; ' + str(e) if str(e) else ''}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fastcd` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    table, prog = COMMANDS, "fastcd"
    if argv and argv[0] == "bench":
        table, prog, argv = BENCHES, "fastcd bench", argv[1:]
    if argv[:1] == ["--version"] and table is COMMANDS:
        try:
            print(f"fastcd {importlib.metadata.version('fastcd')}")
        except importlib.metadata.PackageNotFoundError:
            _error_line(f"fastcd: error: {NOT_INSTALLED}")
            return 2
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        extra = "" if table is BENCHES else "\n  bench    benchmarks (fastcd bench --help)"
        print(_usage(table, prog) + extra)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in table:
        _error_line(f"{prog}: error: unknown command {name!r}; choose from {', '.join(table)}")
        return 2
    lifeline.install()  # what the command forks ends with it (docs/distributed.md, "What a restart leaves")
    try:
        with _sigterm_raises():
            return _run_module(table[name][0], f"{prog} {name}", rest)
    except FastcdError as e:
        _error_line(f"{prog} {name}: error: {e}")
        return 2
    except ModuleNotFoundError as e:
        if ".".join((e.name or "").split(".")[:2]) not in MAPPED:
            raise
        _error_line(f"{prog} {name}: error: no module {e.name}; {NOT_INSTALLED}")
        return 2
    except KeyboardInterrupt as e:
        _stopped(prog, name, "interrupted", e)
        return 130
    except Terminated as e:
        _stopped(prog, name, "terminated (SIGTERM)", e)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
