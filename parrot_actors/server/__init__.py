"""The service: an aiohttp + msgspec HTTP server over one shared runtime (the Parrot API and an
OpenAI-compatible API), and the remote client behind `pa.Runtime.connect(url)`.

    parrot-actors serve --model default --port 9000          # the command line
    server = await start_server(engines, ServerConfig(port=0)) # in a program
    app = create_app(runtime, config)                         # an aiohttp app, for embedding
"""

from __future__ import annotations

from parrot_actors.server.app import Server, create_app, run, start_server
from parrot_actors.server.background import BackgroundServer
from parrot_actors.server.client import RemoteRuntime
from parrot_actors.server.config import ServerConfig

__all__ = [
    "BackgroundServer",
    "RemoteRuntime",
    "Server",
    "ServerConfig",
    "create_app",
    "run",
    "start_server",
]
