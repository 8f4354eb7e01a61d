"""A model's tokenizer in the gateway, for the token route to other engines (``gateway/tokenroute.py``):
load it from the model's files, render its chat template, encode prompts, and decode streamed ids
incrementally.

Needs the ``tokens`` extra (the ``tokenizers`` and ``jinja2`` packages), never torch or transformers:
the gateway stays a light process. What transformers' ``apply_chat_template`` does is done here the
same way: the template from ``tokenizer_config.json`` is rendered by jinja2's sandboxed environment
(``trim_blocks``, ``lstrip_blocks``) with ``messages``, ``add_generation_prompt=True`` and the special
tokens (``bos_token``, ``eos_token``, ...). One difference, on purpose: a message's content is encoded
as plain text, so a client who writes ``<|im_start|>`` in a message gets those characters, not the
control token (transformers would encode the whole rendered string and let content forge turns).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unbroken.config import ConfigError



def _special(value: Any) -> str:
    """A special token of tokenizer_config.json: a string or ``{"content": ...}`` (AddedToken)."""
    if isinstance(value, dict):
        return str(value.get("content") or "")
    return value if isinstance(value, str) else ""


@dataclass
class ChatTokenizer:
    """One model's tokenizer and chat template (see the module's docstring)."""

    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str
    special_tokens: dict[str, str]
    special_ids: frozenset[int]
    _template: Any = field(default=None, repr=False)  # compiled once, on first use

    @classmethod
    def load(cls, directory: str | Path) -> "ChatTokenizer":
        """Load ``directory``'s ``tokenizer.json`` and ``tokenizer_config.json``; a missing file, a
        missing chat template or a missing package is a :class:`ConfigError` at start."""
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("replicas.tokenizers needs the 'tokens' extra (pip install 'unbroken[tokens]': "
                              "the tokenizers and jinja2 packages)") from None
        d = Path(directory)
        try:
            tok = Tokenizer.from_file(str(d / "tokenizer.json"))
            config = json.loads((d / "tokenizer_config.json").read_text())
        except Exception as e:  # OSError, JSON's ValueError, or the tokenizers library's own error
            raise ConfigError(f"replicas.tokenizers: cannot load a tokenizer from {str(d)!r}: {e}") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
        if not isinstance(template, str) and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        if not isinstance(template, str):
            raise ConfigError(f"replicas.tokenizers: {str(d)!r} has no chat template in tokenizer_config.json")
        specials = {name: _special(config.get(name)) for name in
                    ("bos_token", "eos_token", "pad_token", "unk_token")}
        special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        out = cls(tok, template, specials, special_ids)
        try:
            out.compiled_template()
        except ImportError:
            raise ConfigError("replicas.tokenizers needs the 'tokens' extra (pip install 'unbroken[tokens]': "
                              "the tokenizers and jinja2 packages)") from None
        except Exception as e:  # jinja2's TemplateSyntaxError
            raise ConfigError(f"replicas.tokenizers: the chat template in {str(d)!r} does not compile: {e}") from None
        return out

    # -- prompts ---------------------------------------------------------------------------------

    def compiled_template(self) -> Any:
        """The chat template, compiled once in jinja2's sandbox (``raise_exception``, ``tojson`` as
        transformers provides them)."""
        if self._template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
            self._template = env.from_string(self.chat_template)
        return self._template

    def render_chat(self, messages: list[dict[str, Any]], **extra: Any) -> list[str | tuple[str]]:
        """The chat template rendered for ``messages`` with ``add_generation_prompt=True``, as pieces:
        template text (``str``) and message contents (``(content,)``), in order. A template that
        refuses the messages (``raise_exception``) raises ValueError."""
        from jinja2.exceptions import TemplateError

        # The rendered template is split on a marker per content, so that the contents are encoded apart
        # from the template; a fresh random marker per call, so that no client can spell one.
        mark = f"\x00{secrets.token_hex(8)}-{{}}\x00"
        contents: list[str] = []
        marked = []
        for m in messages:
            m = dict(m)
            content = m.get("content")
            if isinstance(content, list):  # text parts only (the contract refuses other parts)
                content = "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
            if isinstance(content, str):
                m["content"] = mark.format(len(contents))
                contents.append(content)
            marked.append(m)

        try:
            text = self.compiled_template().render(messages=marked, add_generation_prompt=True,
                                                   **self.special_tokens, **extra)
        except TemplateError as e:  # e.g. "Conversation roles must alternate"
            raise ValueError(str(e) or type(e).__name__) from None
        pieces: list[str | tuple[str]] = []
        for i, content in enumerate(contents):
            before, sep, text = text.partition(mark.format(i))
            if not sep:  # the template did not print this message's content as given
                raise ValueError("the chat template changes message contents; it cannot be rendered apart")
            pieces += [before, (content,)]
        pieces.append(text)
        return [p for p in pieces if p]

    def chat_prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The prompt ids of a chat: the template's text with its control tokens, the contents as
        plain text."""
        ids: list[int] = []
        for piece in self.render_chat(messages):
            ids += self.encode_text(piece[0]) if isinstance(piece, tuple) else self.encode_template(piece)
        return ids

    def encode_template(self, text: str) -> list[int]:
        """``text`` with its special tokens (``<|im_start|>``) as control tokens."""
        self.tokenizer.encode_special_tokens = False
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """``text`` as plain text: a special token's spelling is encoded as its characters."""
        tok = self.tokenizer
        tok.encode_special_tokens = True
        try:
            return tok.encode(text, add_special_tokens=False).ids
        finally:
            tok.encode_special_tokens = False

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


MAX_HELD = 16  # ids held back at most while their bytes do not form a character (UTF-8 needs 4)


class IncrementalDecoder:
    """The text of streamed ids, piece by piece, as vLLM's detokenizer does it: each new id's text is
    ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])``, held back while it ends in an
    incomplete UTF-8 sequence (``\\ufffd``). ``before`` are ids already streamed (a resumed stream):
    they are replayed, so the decoder is in the state the first one was."""

    def __init__(self, tok: ChatTokenizer, before: list[int] | None = None) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        if before:
            for i in before:
                self.push([i])

    def push(self, new_ids: list[int]) -> str:
        """The text ``new_ids`` add (may be empty while a character is incomplete)."""
        out = []
        for i in new_ids:
            self.ids.append(i)
            if i in self.tok.special_ids:
                continue
            prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
            full = self.tok.decode(self.ids[self.prefix_offset:])
            # A run of bytes that never completes a character is let go after MAX_HELD ids (as
            # U+FFFD): an engine's ids are untrusted, and each held id re-decodes the whole run.
            stuck = len(self.ids) - self.read_offset >= MAX_HELD
            if len(full) > len(prefix) and (stuck or not full.endswith("\ufffd")):
                out.append(full[len(prefix):])
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.ids)
        return "".join(out)
