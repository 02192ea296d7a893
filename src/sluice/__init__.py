"""sluice: a self-hosted, OpenAI-compatible LLM inference server with vLLM inside."""

__version__ = "0.1.0"
