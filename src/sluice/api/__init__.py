"""The HTTP API: OpenAI request schemas, routes, SSE framing and the plumbing around them."""
