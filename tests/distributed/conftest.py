"""The tests here and their workers import ``launch`` from this folder (a worker runs as a script from it)."""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
