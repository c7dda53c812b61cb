"""`vtok` command line: `vtok list`, `vtok describe NAME`, and subcommands that eval/ registers.

Subcommands live beside what they run: each module in ``SUBCOMMANDS`` exposes
``add_parser(subparsers)`` which registers its parser and sets ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: modules that add subcommands (module path, subcommand name) -- imported lazily
SUBCOMMANDS = [
    ("vtok.eval.cli", "eval"),
    ("vtok.eval.demo", "demo"),
    ("vtok.eval.bench", "bench"),
    ("vtok.eval.train", "train"),
]


def _list(args) -> int:
    from vtok import list_methods
    from vtok.adapters import list_adapters

    print("methods: " + ", ".join(list_methods()))
    print("adapters: " + ", ".join(list_adapters()))
    return 0


def _describe(args) -> int:
    from vtok import describe

    model = None
    if args.model:
        from vtok.eval.datasets import load_model

        model = load_model(args.model)
    print(describe(args.name, model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtok", description="Visual-token compression for VLMs and ViTs")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command")
    sp = sub.add_parser("list", help="list methods and adapters")
    sp.set_defaults(func=_list)
    sp = sub.add_parser("describe", help="hyper-parameters of a method")
    sp.add_argument("name")
    sp.add_argument("--model", default=None, help="also count the method's trainable parameters on this model "
                    "(a `vtok eval` model name, e.g. offline-vlm)")
    sp.set_defaults(func=_describe)
    for module, name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # that part of vtok is not built yet
        mod.add_parser(sub)
    return p


#: errors that come from what the user asked for (a name, a setting, a file): one line, exit code 2
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, ImportError)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, before or after the subcommand
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if args.command is None:  # bare `vtok`: what it can do
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `vtok describe x | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0
    except USER_ERRORS as e:
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"vtok {args.command}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
