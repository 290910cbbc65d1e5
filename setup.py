"""Build script: the Python package (C++/CUDA extension in csrc/ is added by the extension build)."""
from setuptools import setup

setup()
