"""The OpenAI-compatible HTTP server (`turbollm serve`): app.py routes, schemas.py requests."""
