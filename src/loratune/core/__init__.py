"""The LoRA core: adapters on any `nn.Module` (config, layers, inject/activate/merge, PEFT's file format).

It imports nothing from the rest of loratune (a test walks the imports to keep it so); the application
(pretrained loading, quant, data, train, the CLI) builds on it. The public names are re-exported by
`loratune` itself.
"""
