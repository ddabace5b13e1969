"""fedlora: federated LoRA / QLoRA fine-tuning on Flower (client side and core)."""

__version__ = "0.1.0"
