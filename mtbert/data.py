"""``mtbert.data``: the CS224N multitask data (see :mod:`mtbert.multitask.data`), and its command line.

    python -m mtbert.data download --to data/       # fetch the official CS224N files
    python -m mtbert.data synthetic --to data-toy/  # write a small synthetic sanity set
    python -m mtbert.data check data/               # load every file, count rows and skipped rows
"""
import argparse
import logging
import sys
from pathlib import Path

from .errors import UserError, run_command
from .multitask.data import (DEFAULT_FILES, OFFICIAL_BASE_URL, TASK_SPECS, TASKS, Example, LengthBucketSampler,
                             TaskFile, collate, download, example_lengths, load_task_file, write_synthetic_data)

__all__ = ["DEFAULT_FILES", "TASKS", "TASK_SPECS", "Example", "LengthBucketSampler", "TaskFile", "collate",
           "download", "example_lengths", "load_task_file", "write_synthetic_data", "main"]


def _check(directory):
    """One line per CS224N file: its rows and skipped rows, "missing", or what makes it unusable.
    Status 0 when every file present loads, 2 when one does not, 1 when none is present."""
    directory = Path(directory)
    found, status = 0, 0
    for (task, split), name in DEFAULT_FILES.items():
        path = directory / name
        if not path.is_file():
            print(f"{name:28s} missing")
            continue
        found += 1
        try:
            loaded = load_task_file(task, path, labeled=split != "test")
        except UserError as err:
            print(f"{name:28s} unusable: {err}")
            status = 2
            continue
        print(f"{name:28s} {len(loaded):7d} rows  {loaded.skipped:3d} skipped")
    return status if found else 1


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m mtbert.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="fetch the official CS224N files (needs internet) and check them")
    fetch.add_argument("--to", required=True, type=Path, help="directory to write the files into")
    fetch.add_argument("--base-url", default=OFFICIAL_BASE_URL, help="where the files live (default: %(default)s)")
    fetch.add_argument("--overwrite", action="store_true", help="download again files that already exist")
    synthetic = commands.add_parser("synthetic", help="write a small learnable synthetic data set in the same format")
    synthetic.add_argument("--to", required=True, type=Path, help="directory to write the files into")
    synthetic.add_argument("--rows", type=int, default=400, help="training rows per task (default: %(default)s)")
    check = commands.add_parser("check", help="load every CS224N file in a directory and count rows")
    check.add_argument("directory", type=Path)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its message")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_command(parser.prog, lambda: _run(args), debug=args.debug)


def _run(args):
    if args.command == "download":
        rows = download(args.to, base_url=args.base_url, overwrite=args.overwrite)
        print(f"{len(rows)} files in {args.to}: " + ", ".join(f"{k} ({v} rows)" for k, v in rows.items()))
        return 0
    if args.command == "synthetic":
        write_synthetic_data(args.to, n_train=args.rows)
        print(f"synthetic data written to {args.to}")
        return 0
    return _check(args.directory)


if __name__ == "__main__":
    sys.exit(main())
