"""A free TCP port: the two pytest-xdist workers run app servers and process groups side by side, so no test may
rely on a default port (gradio's 7860, torch.distributed's 29500)."""

import socket


def free_port() -> int:
    """A port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
