"""The one command-line entry point: ``asd <subcommand> ...`` (also ``python -m pipelines``).

Each subcommand lives in its own module, which exposes ``register(subparsers)``: it adds its
parser and sets ``func`` to a callable taking the parsed arguments and returning an exit code.
Modules are imported lazily by name so that ``asd --help`` does not import Ray or torch.

User errors (:class:`pipelines.errors.UserError`: a bad config, a missing feature store or model,
an unreachable MLflow server) print one line on stderr and exit 2; ``asd --debug <command>``
shows their traceback instead. SIGTERM and Ctrl-C end a command in one line too, with the shell's
codes (143, 130): what it finished is kept, and the same command resumes (but predict and submit).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from pipelines import console
from pipelines.compute_process import tune_allocator
from pipelines.errors import NO_SPACE, UserError

# subcommand -> module that registers it (order = order in --help)
SUBCOMMANDS = {
    "download": "pipelines.datasets.download",
    "synth": "pipelines.synth.cli",
    "extract": "pipelines.stages.extract",
    "train": "pipelines.stages.train",
    "score": "pipelines.stages.score",
    "predict": "pipelines.serving.predict",
    "run": "pipelines.operations.run",
    "retrain": "pipelines.operations.retrain",
    "submit": "pipelines.operations.submit",
}

# commands a re-run does not resume: predict scores its files again; a submitted job goes on on its
# cluster, and a re-run of submit submits another
NOT_RESUMABLE = {"predict", "submit"}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    """The parser with subcommand ``load`` fully registered; the others only listed."""
    parser = argparse.ArgumentParser(
        prog="asd",
        description="Anomalous sound detection with robust prototype learning, on Ray and MLflow.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of user errors (config, missing inputs, MLflow)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print Ray's, Ray Train's and Ray Data's own logs (always in the run's log file)")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, module in SUBCOMMANDS.items():
        if name != load:
            # cheap placeholder so that `asd --help` lists every command without importing it
            sub.add_parser(name, help=_HELP.get(name, ""), add_help=False)
            continue
        importlib.import_module(module).register(sub)
    return parser


_HELP = {
    "download": "download DCASE Task 2 data (2020-2025) into the layout the pipeline reads",
    "synth": "generate synthetic machine sounds in the DCASE 2022 layout",
    "extract": "extract inverted log-Mel features into the Parquet feature store (Ray Data)",
    "train": "train the configured detector, or one of its stages (Ray Train)",
    "score": "score test clips, compute DCASE metrics, log to MLflow and register the model",
    "predict": "score WAV files with a registered or local model",
    "run": "run the whole pipeline from a config",
    "retrain": "retrain on newly arrived recordings and promote if not worse",
    "submit": "submit the whole pipeline to a Ray cluster as a Ray Job",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=command if command in SUBCOMMANDS else None)
    if command not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints help / usage error
        return 2
    args = parser.parse_args(argv)
    tune_allocator()  # the driver computes too: synthesis, in-process embedding, scoring
    console.configure(verbose=args.verbose)
    console.handle_sigterm()
    try:
        return int(args.func(args) or 0)
    except UserError as err:  # the message names the key or file and the fix
        if args.debug:
            raise
        print(f"asd {command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk where no writer of ours names the file (models, scoring files)
        if args.debug or err.errno not in NO_SPACE:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"asd {command}: error: no space left on the device{where} ({err.strerror}): free some space and "
              "re-run the same command", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (console.Terminated)
        if args.debug:
            raise
        signum = signal.SIGTERM if console.terminated() else signal.SIGINT
        hint = "" if command in NOT_RESUMABLE else "; re-run the same command to resume"
        print(f"asd {command}: interrupted by {signum.name}{hint}", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
