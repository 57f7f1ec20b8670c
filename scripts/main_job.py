#!/usr/bin/env python
"""The main job: a tiny softmax GPT and a tiny SA-Softmax GPT trained side by side on CPU, compared at 1x..8x the
training length, after a numerical gradient demo. Same as ``sasoftmax compare``.

    python scripts/main_job.py [--data PATH] [--out runs/compare] [--set max_steps=300]

Defaults: the Python standard library sources as corpus (no download), byte-level BPE 4096, 2 layers x 128 wide,
ALiBi, 1000 steps of 16 x 128 tokens per model in bfloat16 autocast, within a 540 s budget (``--budget``);
``--normalizers a,b,c`` compares other registry entries.
"""

import sys

from sasoftmax.lm.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
