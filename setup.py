"""megatron_sphinx: SPHINX-X multimodal LLM training on Megatron-Core."""
from setuptools import find_packages, setup

setup(
    name="megatron_sphinx",
    version="0.1.0",
    description="Distributed training of the SPHINX-X family on Megatron-Core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_sphinx", "megatron_sphinx.*", "kernels", "kernels.*"]),
    package_data={"kernels": ["csrc/*.cu", "csrc/*.cpp"]},
    extras_require={"gpu": ["transformer-engine[pytorch]==2.20.0"]},
)
