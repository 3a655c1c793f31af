"""The OpenAI-compatible HTTP front-end (frontend.HttpFrontend), its request bodies and responses."""
