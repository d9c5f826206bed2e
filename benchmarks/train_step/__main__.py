"""Entry point of ``python -m benchmarks.train_step``; ``driver.py`` documents the command and its options.

Run from the repository root, e.g.:

    python -m benchmarks.train_step --model qwen2_5_vl-7b --shape fixed
"""

import sys

from benchmarks.train_step.driver import main

if __name__ == "__main__":
    sys.exit(main())
