"""`nomoat serve`: an OpenAI-compatible server for one base model and many adapters, with a web chat.

Uses the runtime and adapters; must not import train or cli.
"""

from nomoat.serve.app import ModelRegistry, ServerSettings, check_listen, create_app, make_server

__all__ = ["ModelRegistry", "ServerSettings", "check_listen", "create_app", "make_server"]
