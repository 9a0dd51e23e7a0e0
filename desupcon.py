#!/usr/bin/env python
"""Launcher so that `python desupcon.py ...` runs the same CLI as the `desupcon` command."""
import sys

from desupcon.cli import main

if __name__ == "__main__":
    sys.exit(main())
