"""Generates the gRPC code from protos/ before setuptools looks for packages.

All metadata is in pyproject.toml. Generation runs on every build (it takes a fraction
of a second), so an install always carries code that matches the .proto files.
"""

import subprocess
import sys
from pathlib import Path

from setuptools import setup

subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "protos" / "gen_python.py")], check=True)
setup()
