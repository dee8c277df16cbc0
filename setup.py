"""xdctools: Cross-Modal Deep Clustering (XDC) toolkit and trainer."""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path("xdctools/__init__.py").read_text()).group(1)

setup(
    name="xdctools",
    version=VERSION,
    description="Self-supervised audio-video representation learning by Cross-Modal Deep Clustering",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["xdctools", "xdctools.*", "trainer", "trainer.*"]),
    include_package_data=True,
    package_data={"xdctools": ["py.typed"]},
    install_requires=[
        # A range that the CPU build 2.13.0 satisfies: install torch first (see README),
        # otherwise pip pulls a multi-GB CUDA build.
        "torch>=2.1",
        "nvidia-dali-cuda120>=1.30",
        "webdataset>=0.2",
        "librosa>=0.10",
        "ffmpeg-python>=0.2",
        "av>=12",  # in-process probing (10 ms instead of an ffprobe process) and frame decoding
        "click>=8.1",
        "zarr>=3.0",
        "numpy>=1.24",
        "pydantic>=2.5",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "tensorboard>=2.14",
    ],
    extras_require={
        # faiss ships as two mutually exclusive wheels providing the same module.
        "cpu": ["faiss-cpu>=1.8"],
        "gpu": ["faiss-gpu-cu12>=1.8"],
        "test": ["pytest>=7", "ruff>=0.5"],
        # --executor slurm (shard, extract, train); the tests run its local executor, without Slurm.
        "slurm": ["submitit>=1.5"],
    },
    entry_points={"console_scripts": ["xdctools=xdctools.cli:main"]},
)
