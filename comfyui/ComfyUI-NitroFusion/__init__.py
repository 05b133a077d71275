"""NitroFusion's ComfyUI nodes: copy (or link) this folder into ComfyUI/custom_nodes/. See README.md."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
