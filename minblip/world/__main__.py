"""``python -m minblip.world --write-samples FOLDER``: write the committed samples."""
from __future__ import annotations

import argparse
from typing import Sequence

from .. import world


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m minblip.world", description=world.__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--write-samples", metavar="FOLDER", required=True, help="write the committed samples into FOLDER"
    )
    args = parser.parse_args(argv)
    world.write_samples(args.write_samples)


if __name__ == "__main__":
    main()
