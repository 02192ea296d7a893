"""The HTTP API: routes around vLLM's OpenAI serving layer, the request's exchange with the
gateway, SSE, middleware and the admin API."""
