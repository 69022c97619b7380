"""How each model sees the prompt: rendering (render.py) and the sandbox that
runs chat templates, which are code from whoever made the model file (sandbox.py)."""

from .render import (
    Message,
    Prompt,
    PromptFormat,
    RenderedPrompt,
    check_encodable,
    check_prompt,
    render,
    render_chat_template,
)

__all__ = [
    "Message",
    "Prompt",
    "PromptFormat",
    "RenderedPrompt",
    "check_encodable",
    "check_prompt",
    "render",
    "render_chat_template",
]
