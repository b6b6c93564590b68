import re
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="tfsubspace",
    # the one version string lives in tfsubspace/__init__.py
    version=re.search(
        r'__version__ = "([^"]+)"', Path(__file__).with_name("tfsubspace").joinpath("__init__.py").read_text()
    ).group(1),
    description="Compress trained Keras CNNs by teacher latent subspace learning and LASSO, "
    "and ship them as small, fast .tflite models.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tfsubspace", "tfsubspace.*"]),
    python_requires=">=3.11,<3.13",
    # The TensorFlow wheel is an extra (cpu or gpu) so that installing the base package
    # never puts the full `tensorflow` wheel next to `tensorflow-cpu`.
    install_requires=[
        "keras>=3.10,<4",
        "numpy>=1.26",
        "absl-py>=1.2",  # tensorflow-model-optimization 0.8 pins absl-py 1.x
        "matplotlib>=3.8",
        "tensorboard>=2.20",
    ],
    extras_require={
        "cpu": ["tensorflow-cpu==2.21.*"],
        "gpu": ["tensorflow[and-cuda]==2.21.*"],
        "edge": ["ai-edge-litert==2.3.*", "tflite-micro==0.dev20261023182759"],
        "datasets": ["tensorflow-datasets>=4.9.6", "importlib_resources"],
        # tf-keras pulls in the full `tensorflow` wheel: use this extra in its own environment.
        "tfmot": ["tf-keras==2.21.*", "tensorflow-model-optimization==0.8.*"],
        "dev": ["pytest>=8", "pytest-xdist>=3.6", "hypothesis>=6.100", "ruff==0.17.*"],
    },
)
