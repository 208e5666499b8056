"""DVC stage `sweep@TABLE`: run one paper table's grid with Ray Tune (see pipeline/sweep.py)."""
import sys

from pipeline.sweep import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
