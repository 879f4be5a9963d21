"""`pimaster doc [FUNCTION | MODULE]`: the reference of the state functions a state file can use.

Read from the piagent installed beside the master (the catalogue the master falls back on); a node
running another piagent version may differ: `piagent state FUNCTION --help` on it shows its own.
Needs no running master.
"""

from __future__ import annotations

import sys

from ..cli import EXIT_OK, print_json, report_error


def add_parser(sub, name, summary, common, as_json) -> None:
    doc = sub.add_parser(name, parents=[as_json], help=summary,
                         description="Without an argument: every state function with its one-line summary. "
                                     "With a module (file): its functions. With module.function "
                                     "(file.managed): its reference, arguments, types and an example.")
    doc.add_argument("function", nargs="?", metavar="FUNCTION",
                     help="module.function (file.managed), a module (file), or nothing for all of them")
    doc.set_defaults(run=run, needs_master=False)


def run(args) -> int:
    from piagent.states import catalog, close_names, reference

    functions = catalog()
    wanted = args.function
    if wanted in functions:
        if args.json:
            print_json({"function": wanted, **functions[wanted], "reference": reference(wanted)})
        else:
            sys.stdout.write(reference(wanted))
        return EXIT_OK
    chosen = sorted(f for f in functions if wanted is None or f.split(".")[0] == wanted)
    if not chosen:
        modules = sorted({f.split(".")[0] for f in functions})
        close = close_names(wanted, list(functions) + modules)
        return report_error(args, f"no state function or module {wanted!r}"
                            + (f" (did you mean {', '.join(close)}?)" if close else "")
                            + "; `pimaster doc` lists them")
    if args.json:
        print_json({"functions": {f: functions[f] for f in chosen}})
        return EXIT_OK
    width = max(len(f) for f in chosen)
    for function in chosen:
        print(f"{function:{width}}  {functions[function]['summary']}")
    return EXIT_OK
