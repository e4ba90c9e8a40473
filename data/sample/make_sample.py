#!/usr/bin/env python3
"""Regenerate the bundled sample corpus in data/sample/ (its generator: pipelines/synthetic/images.py).

    python data/sample/make_sample.py            # writes next to this script
    python data/sample/make_sample.py --out DIR  # elsewhere
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runs from a checkout without an install

from pipelines.synthetic.images import main

if __name__ == "__main__":
    main()
