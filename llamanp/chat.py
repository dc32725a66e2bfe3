"""Chat templates, rendered straight to token ids.

A chat model was fine-tuned on conversations laid out in one fixed format:
special tokens mark where each message starts and ends and who is speaking.
To talk to the model, a conversation has to be laid out the same way, token for
token. Hugging Face describes that layout as a Jinja template that renders
*text*, which is then tokenized; that step turns "<|im_end|>" typed by a user
into the real control token. llamanp renders the three layouts Llama-family
chat models use directly to ids instead: special tokens are inserted by id, and
only the text between two of them goes through the tokenizer (as one piece,
which is what a Hugging Face tokenizer does with the rendered text, so the ids
are those of ``apply_chat_template(..., tokenize=True)``). What a user types is
always plain text.

    llama2  <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>
            <s>[INST] {user} [/INST]
            Meta's chat_completion: "[INST]" is plain text, every exchange is one
            piece of text between BOS and EOS, contents are stripped, and a
            system prompt goes into the first user message.
    llama3  <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>...
            generation prompt: <|start_header_id|>assistant<|end_header_id|>\\n\\n
            Contents are stripped, as Meta's template does.
    chatml  <|im_start|>{role}\\n{content}<|im_end|>\\n...
            generation prompt: <|im_start|>assistant\\n
            Some models (SmolLM2, Qwen) add a default system message when the
            conversation does not start with one; that message is read from the
            model's embedded template text.

Messages are dicts ``{"role": ..., "content": ...}``. An assistant message may
also carry ``"tokens"``: the ids the model generated for it. Those ids are then
used instead of encoding the content, placed right after the generation prompt,
which is exactly where the model produced them. This is what lets a chat keep
its KV cache from one turn to the next: the conversation re-rendered with its
answers is, token for token, the sequence that was fed while generating.

Which template a model uses is decided by :func:`choose_template`: by name when
one is given, else from the template text embedded in the model file, else from
the tokenizer's special tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import LlamanpError

TEMPLATE_NAMES = ("llama2", "llama3", "chatml")

_CHOOSE_HINT = "choose one with --chat-template " + "|".join(TEMPLATE_NAMES)


# -- messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A checked message. `tokens` is None unless the ids of the content are known."""

    role: str
    content: str
    tokens: Optional[tuple[int, ...]] = None


def check_messages(messages, tokenizer=None) -> list[Message]:
    """Validate a list of message dicts; raise LlamanpError naming the first bad one.

    With a tokenizer, the ids in "tokens" must also lie in its vocabulary.
    """
    if not isinstance(messages, (list, tuple)):
        raise LlamanpError("messages must be a list of {'role': ..., 'content': ...} objects")
    vocab = getattr(tokenizer, "vocab_size", None)
    checked = []
    for n, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            raise LlamanpError(f"message {n} is not an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role or "\n" in role:
            raise LlamanpError(f"message {n} has no valid 'role' (system, user or assistant)")
        if not isinstance(content, str):
            raise LlamanpError(f"message {n} ({role}) has no text 'content'")
        tokens = m.get("tokens")
        if tokens is not None:
            if role != "assistant":
                raise LlamanpError(f"message {n} ({role}) carries 'tokens'; only the model's "
                                   "own (assistant) messages may")
            if not isinstance(tokens, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0
                    and (vocab is None or i < vocab) for i in tokens):
                raise LlamanpError(f"message {n} has 'tokens' that are not token ids of this "
                                   "model's vocabulary")
            tokens = tuple(tokens)
        checked.append(Message(role, content, tokens))
    return checked


# -- templates -----------------------------------------------------------------------


class ChatTemplate:
    """One chat layout, bound to a tokenizer.

    `end_of_turn_ids` are the token(s) that close an assistant message in this
    layout; `stop_ids` are the ids at which an answer ends: those, plus the
    tokenizer's end-of-sequence and stop ids.
    """

    name = ""

    def __init__(self, tokenizer, default_system: Optional[str] = None):
        self.tokenizer = tokenizer
        self.default_system = default_system
        self.end_of_turn_ids: tuple[int, ...] = ()

    @property
    def stop_ids(self) -> frozenset[int]:
        tok = self.tokenizer
        ids = set(self.end_of_turn_ids) | set(getattr(tok, "stop_ids", None) or ())
        if getattr(tok, "eos_id", None) is not None:
            ids.add(tok.eos_id)
        return frozenset(ids)

    def render(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """The token ids of `messages`, followed (by default) by the prompt that
        asks the model for the assistant's answer."""
        return self._render(check_messages(messages, self.tokenizer), add_generation_prompt)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # -- for subclasses --------------------------------------------------------------
    def _render(self, messages: list[Message], add_generation_prompt: bool) -> list[int]:
        raise NotImplementedError

    def _special(self, text: str) -> int:
        """The id of a special token this layout needs, or a one-line refusal."""
        id = self.tokenizer.special_id(text)
        if id is None:
            raise LlamanpError(f"the tokenizer has no {text} token, so it cannot use the "
                               f"{self.name} chat template; {_CHOOSE_HINT}")
        return id

    def _text(self, text: str) -> list[int]:
        """Plain text between special tokens (special-looking text stays text)."""
        return list(self.tokenizer.encode(text)) if text else []


class Llama2Template(ChatTemplate):
    """Meta's Llama 2 chat format (llama/generation.py chat_completion)."""

    name = "llama2"

    def __init__(self, tokenizer, default_system=None):
        super().__init__(tokenizer, default_system)
        if tokenizer.bos_id is None or tokenizer.eos_id is None:
            raise LlamanpError("the llama2 chat template needs a tokenizer with BOS and EOS "
                               f"tokens; {_CHOOSE_HINT}")
        self.bos, self.eos = tokenizer.bos_id, tokenizer.eos_id
        self.end_of_turn_ids = (self.eos,)

    def _render(self, messages, add_generation_prompt):
        # The [/INST] that ends each user message is the generation prompt, so
        # add_generation_prompt changes nothing here.
        system, first = None, 1
        if messages and messages[0].role == "system":
            system, messages, first = messages[0].content, messages[1:], 2
        for n, m in enumerate(messages):
            want = "user" if n % 2 == 0 else "assistant"
            if m.role != want:
                raise LlamanpError(
                    f"the llama2 chat format needs user and assistant messages in turn after an "
                    f"optional system message, but message {first + n} is {m.role!r} where "
                    f"{want!r} belongs")
        ids: list[int] = []
        for i in range(0, len(messages), 2):
            user = messages[i].content
            if i == 0 and system is not None:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            prompt = f"[INST] {user.strip()} [/INST]"
            answer = messages[i + 1] if i + 1 < len(messages) else None
            if answer is None:
                ids += [self.bos, *self._text(prompt)]
            elif answer.tokens is not None:
                ids += [self.bos, *self._text(prompt), *answer.tokens, self.eos]
            else:
                ids += [self.bos, *self._text(f"{prompt} {answer.content.strip()} "), self.eos]
        return ids


class Llama3Template(ChatTemplate):
    """Meta's Llama 3 Instruct format."""

    name = "llama3"

    def __init__(self, tokenizer, default_system=None):
        super().__init__(tokenizer, default_system)
        self.bos = self._special("<|begin_of_text|>")
        self.start_header = self._special("<|start_header_id|>")
        self.end_header = self._special("<|end_header_id|>")
        self.eot = self._special("<|eot_id|>")
        self.end_of_turn_ids = (self.eot,)

    def _header(self, role: str) -> list[int]:
        return [self.start_header, *self._text(role), self.end_header]

    def _render(self, messages, add_generation_prompt):
        ids = [self.bos] if messages else []      # BOS comes with the first message
        for m in messages:
            ids += self._header(m.role)
            if m.tokens is not None:
                ids += self._text("\n\n") + list(m.tokens)
            else:
                ids += self._text("\n\n" + m.content.strip())
            ids.append(self.eot)
        if add_generation_prompt:
            ids += self._header("assistant") + self._text("\n\n")
        return ids


class ChatMLTemplate(ChatTemplate):
    """The ChatML format (<|im_start|>role\\ncontent<|im_end|>\\n)."""

    name = "chatml"

    def __init__(self, tokenizer, default_system=None):
        super().__init__(tokenizer, default_system)
        self.im_start = self._special("<|im_start|>")
        self.im_end = self._special("<|im_end|>")
        self.end_of_turn_ids = (self.im_end,)

    def _message(self, m: Message) -> list[int]:
        if m.tokens is not None:
            body = self._text(m.role + "\n") + list(m.tokens)
        else:
            body = self._text(f"{m.role}\n{m.content}")
        return [self.im_start, *body, self.im_end, *self._text("\n")]

    def _render(self, messages, add_generation_prompt):
        ids: list[int] = []
        if self.default_system is not None and messages and messages[0].role != "system":
            ids += self._message(Message("system", self.default_system))
        for m in messages:
            ids += self._message(m)
        if add_generation_prompt:
            ids += [self.im_start, *self._text("assistant\n")]
        return ids


_TEMPLATES = {cls.name: cls for cls in (Llama2Template, Llama3Template, ChatMLTemplate)}


# -- choosing a template -------------------------------------------------------------


def _tokenizer_of(model_or_tokenizer):
    """Accept a Model (its tokenizer) or a tokenizer."""
    if hasattr(model_or_tokenizer, "special_id"):
        return model_or_tokenizer
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    if tok is None:
        raise LlamanpError("the model has no tokenizer, so it cannot chat; pass one with "
                           "-t TOKENIZER")
    return tok


def embedded_template(tokenizer) -> Optional[str]:
    """The chat template text stored with the tokenizer (a Jinja string), if any."""
    text = getattr(getattr(tokenizer, "data", None), "chat_template", None)
    return text if isinstance(text, str) and text.strip() else None


def detect_template(model_or_tokenizer) -> str:
    """The name of the layout a model expects, from what it knows about itself.

    The embedded template text decides when there is one; otherwise the
    tokenizer: Llama 3's header tokens mean llama3, <|im_start|> means chatml,
    and a SentencePiece or llama2.c tokenizer with BOS and EOS means llama2
    ("[INST]" is plain text there).
    """
    tok = _tokenizer_of(model_or_tokenizer)
    text = embedded_template(tok)
    if text is not None:
        if "<|start_header_id|>" in text:
            return "llama3"
        if "<|im_start|>" in text:
            return "chatml"
        if "[INST]" in text and "<<SYS>>" in text:
            return "llama2"
        raise LlamanpError("the model's embedded chat template is not in a layout llamanp "
                           f"renders ({', '.join(TEMPLATE_NAMES)}); {_CHOOSE_HINT} to use "
                           "the closest")
    def has(*texts):
        return all(tok.special_id(t) is not None for t in texts)

    if has("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        return "llama3"
    if has("<|im_start|>", "<|im_end|>"):
        return "chatml"
    kind = getattr(getattr(tok, "data", None), "kind", None)
    # run.c's chat mode, too, writes Llama 2's format for any tokenizer.bin.
    if kind in ("sentencepiece", "llama2c") and tok.bos_id is not None \
            and tok.eos_id is not None:
        return "llama2"
    raise LlamanpError("cannot tell which chat layout this model uses (no chat template is "
                       f"embedded and its tokenizer has no chat tokens); {_CHOOSE_HINT}")


# '<|im_start|>system\n ... <|im_end|>' written as one Jinja string literal; the
# newline may be a real one or the escape \n.
_CHATML_DEFAULT_SYSTEM = re.compile(
    r"""(['"])<\|im_start\|>system(?:\n|\\n)((?:(?!\1)[^\\]|\\.)*?)<\|im_end\|>""", re.S)
_JINJA_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def chatml_default_system(template_text: Optional[str]) -> Optional[str]:
    """The system message a ChatML template writes itself, if it has one.

    SmolLM2's template, for instance, opens with
    ``{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\\n' }}``
    when the first message is not a system one. A system turn written out as
    one string literal is taken to be such a default (a template that renders
    a given system message builds it from message['content'] instead).
    """
    if not template_text:
        return None
    match = _CHATML_DEFAULT_SYSTEM.search(template_text)
    if match is None:
        return None
    return re.sub(r"\\(.)", lambda e: _JINJA_ESCAPES.get(e.group(1), e.group(0)),
                  match.group(2), flags=re.S)


def choose_template(model_or_tokenizer, name: Optional[str] = None) -> ChatTemplate:
    """The chat template for a model (or tokenizer): `name` if given, else detected."""
    if name is not None and (not isinstance(name, str) or name not in _TEMPLATES):
        raise LlamanpError(f"unknown chat template {name!r}; choose one of "
                           f"{', '.join(TEMPLATE_NAMES)}")
    tok = _tokenizer_of(model_or_tokenizer)
    cls = _TEMPLATES[name if name is not None else detect_template(tok)]
    default_system = None
    if cls is ChatMLTemplate:
        default_system = chatml_default_system(embedded_template(tok))
    return cls(tok, default_system=default_system)


def render(tokenizer, messages: Sequence[dict], template=None,
           add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation in a chat template.

    `tokenizer` is a Tokenizer (or a Model); `template` is a ChatTemplate, a
    template name, or None to use the one the model expects.
    """
    if not isinstance(template, ChatTemplate):
        template = choose_template(tokenizer, template)
    return template.render(messages, add_generation_prompt)
