"""Chat templates: the model's jinja2 template rendered exactly as transformers renders it.

Templates are untrusted code, so they run in jinja2's immutable sandbox with transformers' globals.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox


class ChatTemplateError(ValueError):
    """The chat template is missing, raised an error, or the messages cannot be rendered."""


class ChatTemplate:
    def __init__(self, source: str) -> None:
        try:
            self._template = _jinja_env().from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from e

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None,
        variables: dict[str, Any],
    ) -> str:
        """Render a conversation; `variables` (special tokens, caller's kwargs) are template globals."""
        if not messages:
            raise ChatTemplateError("cannot render an empty conversation")
        chat = [_prepare_message(m) for m in messages]
        try:
            return self._template.render(
                messages=chat,
                tools=_plain(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **_plain(variables),
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}") from e
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
            raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e


def _prepare_message(message: dict[str, Any]) -> dict[str, Any]:
    """A plain copy the template may see: no None values, text parts flattened, reasoning aliased."""
    if not isinstance(message, dict):
        raise ChatTemplateError(f"a chat message must be an object, got {type(message).__name__}")
    # transformers drops None values: templates test `'key' in message`, and OpenAI clients send nulls.
    out = {k: _plain(v) for k, v in message.items() if v is not None}
    if isinstance(out.get("content"), list):
        out["content"] = _flatten_content(out["content"])
    reasoning = next((out[k] for k in ("reasoning_content", "thinking", "reasoning") if k in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def _plain(value: Any) -> Any:
    """A copy made only of JSON-like types: rich objects have methods the sandbox does not know to block."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_plain(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    for base in (str, int, float):
        if isinstance(value, base):
            return base(value)
    return f"<{type(value).__name__}>"


def _flatten_content(parts: list[Any]) -> str:
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"only text content parts are supported, got a {kind!r} part")
        texts.append(part["text"])
    # Joined by newlines, as vLLM does for OpenAI content part lists.
    return "\n".join(texts)


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}` block (marks assistant text for training); renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore names so a template cannot reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _jinja_env() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in (templates are untrusted code)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env
