#!/usr/bin/env python
# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""Convert official Focal Transformer checkpoints to Hugging Face folders; the same as the `focal-convert` command.
Run with --help for the options."""

import sys

from focal_hf.convert import main

if __name__ == "__main__":
    sys.exit(main())
