"""A simulated vLLM server for tests and benchmarks, a real HTTP server on loopback: `python -m qa_pipeline.simulator`.

config: its options; content: what it answers; engine: its continuous-batching capacity model; server: the
HTTP API and metrics; batch: a `vllm run-batch`-like runner; process: a child process for tests and benchmarks.
"""
