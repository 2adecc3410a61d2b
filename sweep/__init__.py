"""`python -m sweep`: compose the arms of a batch-size-scaling study, check them, run or submit them.

Importing this package must stay light (no torch): it runs on login nodes.
"""

from pathlib import Path


def config_dir() -> str:
    """conf/: beside the packages in a checkout, inside this package in an installed wheel (the
    wheel carries it there: pyproject's force-include)."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return str(packaged if packaged.is_dir() else here.parent / "conf")
