"""rela-fairseq: Rectified Linear Attention (Zhang, Titov & Sennrich, EMNLP 2021) for fairseq."""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "rela_fairseq", "__init__.py"), encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    LONG_DESCRIPTION = f.read()

setup(
    name="rela-fairseq",
    version=VERSION,
    description="Rectified Linear Attention (ReLA) and sparse-attention baselines as a fairseq plugin",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["rela_fairseq", "rela_fairseq.*", "rela_tools", "rela_tools.*"]),
    package_data={"rela_fairseq.kernels": ["*.cpp"]},  # compiled on first use (--rela-kernel)
    python_requires=">=3.8",
    install_requires=[
        # fairseq 0.12.2 does not import on Python >= 3.11; fairseq-fixed is fairseq main with that fix.
        "fairseq==0.12.2; python_version < '3.11'",
        "fairseq-fixed==0.12.3.1; python_version >= '3.11'",
        "torch>=1.13",
        "entmax>=1.1",
        "sacrebleu>=2.0",
        "sentencepiece>=0.1.97",
        "sacremoses>=0.0.53",  # tokenised, compound-split BLEU for WMT14 En-De
        "pyyaml",  # configs/*.yaml
        "tqdm",
    ],
    extras_require={
        "analysis": ["matplotlib>=3.5"],
        # the fused ReLA kernels: ninja builds the CPU one on first use (with a C++ compiler); CUDA builds of torch
        # bring Triton, which runs the GPU ones
        "kernels": ["ninja"],
        # Triton also runs the GPU kernels' tests on a CPU, in its interpreter
        "test": ["pytest>=7", "matplotlib>=3.5", "ruff==0.17.6", "mypy==1.20.2", "ninja",
                 "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    },
    entry_points={
        "console_scripts": [
            "rela-analyze = rela_tools.analyze.cli:main",
            "rela-average-checkpoints = rela_tools.averaging:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "License :: OSI Approved :: MIT License",
    ],
)
