"""The `pylvs` command: `run` (the director), `adm` (ipvsadm), `lab` (namespaces),
`realserver` (the real-server side), `check` (set-up errors)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "run": ("pylvs.runtime.daemon", "run the director"),
    "adm": ("pylvs.cli.adm", "ipvsadm-compatible control of a running director"),
    "stats": ("pylvs.cli.tools:stats_main", "a running director's engine counters"),
    "sysctl": ("pylvs.cli.tools:sysctl_main", "read or set a running director's knobs"),
    "reload": ("pylvs.cli.tools:reload_main", "make a running director re-read its -c file"),
    "lab": ("pylvs.cli.lab", "network-namespace labs"),
    "realserver": ("pylvs.realserver.cli", "the real-server side: setup/status/teardown/run"),
    "check": ("pylvs.cli.check", "check a running director's set-up against the network"),
}

USAGE = f"usage: pylvs {{{','.join(COMMANDS)}}} [args...]\n\n" + "".join(
    f"  {name:<10} {what}\n" for name, (_, what) in COMMANDS.items())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"pylvs: unknown command {name!r}\n{USAGE}")
        return 2
    if name == "run":
        # SIGHUP's default action kills the process: not while the director
        # is being imported (its -c file is read after that anyway);
        # pylvs.runtime.daemon takes the signal over from there.
        import signal
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    modname, _, func = COMMANDS[name][0].partition(":")
    # Lazy: one missing or broken subcommand must not take the others down.
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        sys.stderr.write(f"pylvs {name}: not available ({modname}: {e})\n")
        return 2
    entry = getattr(mod, func or "main", None)
    if entry is None:
        sys.stderr.write(f"pylvs {name}: {modname} has no {func or 'main'}()\n")
        return 2
    rc = entry(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
