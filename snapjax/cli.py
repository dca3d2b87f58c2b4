"""The ``snapjax`` command: a thin dispatcher over the library.

Each subcommand lives in the module that does its work and exposes two functions,
``add_arguments(parser)`` and ``run(args) -> int``; this file only lists them, importing a
module when its subcommand is used so that ``snapjax --help`` stays fast. Packages outside
snapjax (``export/``) add subcommands through the ``snapjax.commands`` entry-point group, so
snapjax never imports them.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("snapjax.sample", "generate images from prompts with any checkpoint"),
    "summary": ("snapjax.summary", "parameters and GFLOPs per component"),
    "import": ("snapjax.convert.diffusers_import", "convert a diffusers folder to a snapjax checkpoint"),
    "train": ("snapjax.train.loop", "train a model from a config"),
    "evolve": ("snapjax.evolve.run", "robust training + architecture evolution of a UNet"),
    "distill": ("snapjax.train.distill_chain",
                "step distillation's schedule (progressive or direct) as one chain of runs"),
    "score-blocks": ("snapjax.evolve.score", "quality lost when each UNet block is dropped"),
    "eval": ("snapjax.eval.run", "score pipelines over steps and guidance: metrics, plot, grids"),
    "world": ("snapjax.train.world", "train the embedded world's VAE and teacher, score samples"),
    "prepare": ("snapjax.data.prepare", "cache VAE latents and text embeddings as ArrayRecord shards"),
    "generate-latents": ("snapjax.data.generated",
                         "cache a teacher pipeline's generated latents as ArrayRecord shards"),
}


class UserError(Exception):
    """An error the user can fix (bad path, bad flag); printed without a traceback."""


def _plugins() -> dict[str, str]:
    """Entry points ``name = "module:register"``; register(subparsers) adds the subcommand."""
    return {ep.name: ep.value for ep in entry_points(group="snapjax.commands")}


def _plugin_help(module: str) -> str:
    """The first line of a plugin module's docstring, read without importing the module."""
    try:
        spec = importlib.util.find_spec(module)
        # local: a module file of an installed package
        doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))
    except (ImportError, AttributeError, TypeError, OSError, SyntaxError):
        doc = None
    return doc.splitlines()[0].replace("``", "") if doc else f"(from {module})"


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snapjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == selected:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    for name, target in _plugins().items():
        if name == selected:
            module, func = target.split(":")
            getattr(importlib.import_module(module), func)(sub)
        else:
            sub.add_parser(name, help=_plugin_help(target.split(":")[0]))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected)
    args, extra = parser.parse_known_args(argv)
    # Subcommands that take config overrides (--config.opt.lr=1e-4) set _accepts_overrides and
    # get the flags argparse does not know as args.overrides; anywhere else they are errors.
    if extra:
        if not getattr(args, "_accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:
        return int(args._run(args) or 0)
    except (UserError, FileNotFoundError, FileExistsError, PermissionError, ValueError) as e:
        # Our own checks raise these with a message naming the bad input; no traceback needed.
        print(f"snapjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
