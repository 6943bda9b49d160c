"""loratune: LoRA fine-tuning with a small core and PEFT-compatible adapter files."""
