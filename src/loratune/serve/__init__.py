"""`loratune serve`: an OpenAI-compatible server of one base model with many adapters, batched together."""
