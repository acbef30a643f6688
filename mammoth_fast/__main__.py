"""``python -m mammoth_fast train|eval ...``: the mammoth-fast command (mammoth_fast/cli.py);
``torchrun --nproc-per-node=G -m mammoth_fast train ...`` trains on G GPUs."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
