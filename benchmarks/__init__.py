"""Benchmarks that decide something: loratune against PEFT (`speed`), the demo's job against TRL (`race`), the
server under load (`serve`) and abuse (`serve_abuse`), crash safety (`soak`), exports in llama.cpp (`runtimes`).

`common` holds what they share: child processes with their own peak memory, the machine's description, the
results writer and the server starter. Run `python -m benchmarks --help`.
"""
