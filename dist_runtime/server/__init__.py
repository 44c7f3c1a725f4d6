"""The HTTP front end on rank 0: OpenAI-compatible routes over the LLM API, with metrics."""
