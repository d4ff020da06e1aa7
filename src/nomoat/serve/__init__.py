"""`nomoat serve`: an OpenAI-compatible server for one base model and many adapters, with a web chat."""

from nomoat.serve.app import ModelRegistry, ServerSettings, create_app, make_server

__all__ = ["ModelRegistry", "ServerSettings", "create_app", "make_server"]
