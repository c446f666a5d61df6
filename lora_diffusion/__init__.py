"""lora-diffusion: parameter-efficient fine-tuning of masked diffusion language models."""

__version__ = "0.1.0"
