"""``python -m dfm_fused``: the benchmark of dfm_fused against the reference with default settings.

Same as ``python -m dfm_fused.bench`` (console script ``dfm-fused-bench``), which takes flags.
"""
import sys

from dfm_fused.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
