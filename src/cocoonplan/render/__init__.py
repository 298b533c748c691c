"""Renderers. All of them start from one document, :func:`plan_document`, so they cannot disagree."""

from cocoonplan.render.document import plan_document, render_json
from cocoonplan.render.text import render_human, render_markdown, render_markdown_parts

__all__ = ["plan_document", "render_human", "render_json", "render_markdown", "render_markdown_parts"]
