"""The interactive chat console: a conversation whose KV cache lives on.

    llama-np.py -w MODEL.lmw --chat [--system TEXT] [--chat-template NAME]
                                    [--context-policy stop|drop-oldest] [-n N] [--temp T] ...

(llamanp/cli.py builds the command line and calls run_chat_from_args; this
module does not know the command line beyond the chat options it adds.)

Type a message and the answer streams back. On a terminal, lines can be edited
and recalled (readline); Ctrl-C stops the answer being written (not the
program) and Ctrl-D leaves. With piped input every line is one user message and
the answers are printed one after the other, for scripting; notices then go to
stderr, so stdout holds the answers only, and a message that cannot be answered
(it does not fit in the context) ends the run with exit status 1. `--chat -i
TEXT` answers the one message TEXT and exits. Each answer is at most -n tokens
(256 unless told; -n -1 lifts the cap).

Commands (a message that itself starts with "/" is typed with "//"):

    /reset          start a new conversation (the system prompt stays)
    /system TEXT    set the system prompt; /system alone removes it
    /save FILE      write the conversation to FILE (JSON, see below)
    /load FILE      continue the conversation saved in FILE
    /stats          per-turn statistics
    /quit           leave (so do Ctrl-D and the end of piped input)

How the cache is reused. The conversation is a list of messages in which each
answer keeps the token ids the model generated for it. Before every answer the
whole conversation is rendered with the chat template (llamanp.chat), which,
thanks to those ids, reproduces token for token what is already in the cache.
The rendering is compared with the cache, the common prefix is kept and only
the rest is computed: the previous answer's closing tokens (the end-of-turn
token the model emitted was never fed, so it is fed now, as part of the next
turn), the new message, and the generation prompt. So the sequence the model
has seen is always exactly what render() gives for the whole conversation, and
a turn costs its new tokens only. The same comparison covers every other
change: /reset and /load keep whatever prefix (the system prompt) still
matches; a new system prompt is recomputed from the start.

When the conversation no longer fits in the context (--context-policy):

    stop         (the default) say so and go no further: an answer that reaches
                 the end of the context is cut there, and a message that does
                 not fit is not sent. Nothing is forgotten behind your back;
                 /reset starts a new conversation.
    drop-oldest  forget the oldest exchanges (a user message and its answer),
                 never the system prompt nor the message being answered, until
                 the conversation takes at most half of the context (so that
                 this happens rarely). The cached prefix that is still valid
                 (the system prompt) is kept and the rest is recomputed. This
                 happens before a message is sent and also when an answer
                 reaches the end of the context, which then goes on.

Statistics, per turn: the prompt's length, how much of it was reused from the
cache and how much computed, the tokens generated, prefill and decode speed,
and why the answer ended. /stats prints them; --stats-json FILE writes them in
the JSON Lines format: one JSON object per line, one line per turn, each
written as its turn ends.

Saved conversations are JSON: {"format": "llamanp-chat", "version": 1,
"template": NAME, "messages": [{"role", "content"[, "tokens"]}, ...]}. An
answer's "tokens" are its exact ids; on loading they are used only when they
decode to the message's content, so a file edited by hand, or made for another
model, falls back to the text. /load also accepts a plain list of messages.
"""

from __future__ import annotations

import builtins
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from . import fileio, inputfile
from .chat import TEMPLATE_NAMES, ChatTemplate, check_messages, choose_template
from .errors import LlamanpError
from .kvcache import require

CONTEXT_POLICIES = ("stop", "drop-oldest")
DEFAULT_CONTEXT_POLICY = "stop"

FILE_FORMAT = "llamanp-chat"
FILE_VERSION = 1


# -- one conversation, without any I/O ----------------------------------------------


@dataclass
class TurnStats:
    """What one answer cost."""

    turn: int
    prompt_tokens: int = 0       # the rendered conversation fed before the answer
    reused_tokens: int = 0       # ... of which were already in the cache
    computed_tokens: int = 0     # positions run through the model for it (and for
                                 # any recomputation after dropping old messages)
    generated_tokens: int = 0
    decode_steps: int = 0        # generated tokens fed back to the model
    dropped_messages: int = 0    # forgotten by the drop-oldest policy in this turn
    context_tokens: int = 0      # positions in use when the answer ended
    context_size: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    # why the answer ended: end_of_turn (the template's token), eos (another end or
    # stop id of the tokenizer), length (max_new_tokens), context or interrupted
    stop_reason: str = ""

    @property
    def prefill_tps(self) -> float:
        return self.computed_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefill_seconds"] = round(self.prefill_seconds, 6)
        d["decode_seconds"] = round(self.decode_seconds, 6)
        d["prefill_tokens_per_second"] = round(self.prefill_tps, 3)
        d["decode_tokens_per_second"] = round(self.decode_tps, 3)
        return d

    def line(self) -> str:
        return (f"turn {self.turn}: prompt {self.prompt_tokens} tokens ({self.reused_tokens} "
                f"reused, {self.computed_tokens} computed) | generated {self.generated_tokens}"
                f" | prefill {self.prefill_tps:.1f} tok/s | decode {self.decode_tps:.1f} tok/s"
                + (f" | dropped {self.dropped_messages} messages" if self.dropped_messages
                   else "") + f" | {self.stop_reason}")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Chat:
    """A conversation with a model whose KV cache persists from turn to turn.

    `messages` is the conversation (answers carry their token ids, see the
    module docstring); `turns` holds a TurnStats per answer.
    """

    def __init__(self, model, template=None, kvcache: str = "inplace",
                 max_seq_len: Optional[int] = None,
                 context_policy: str = DEFAULT_CONTEXT_POLICY, system: Optional[str] = None,
                 hooks=None):
        if context_policy not in CONTEXT_POLICIES:
            raise LlamanpError(f"unknown context policy {context_policy!r}; choose one of "
                               f"{', '.join(CONTEXT_POLICIES)}")
        self.template: ChatTemplate = (template if isinstance(template, ChatTemplate)
                                       else choose_template(model, template))
        self.tokenizer = self.template.tokenizer
        self.model = model
        self.context_policy = context_policy
        self.session = model.session(kvcache, max_seq_len, hooks)   # see llamanp.inspect
        if context_policy == "drop-oldest":   # it forgets by truncating the cache
            require(self.session.cache, "--context-policy drop-oldest", truncates=True)
        self.messages: list[dict] = []
        self.turns: list[TurnStats] = []
        self.set_system(system)

    @property
    def context_size(self) -> int:
        return self.session.max_seq_len

    @property
    def system(self) -> Optional[str]:
        if self.messages and self.messages[0]["role"] == "system":
            return self.messages[0]["content"]
        return None

    # -- changing the conversation ---------------------------------------------------
    def set_system(self, text: Optional[str]) -> None:
        """Set (or with None or "", remove) the system prompt; the history stays."""
        if text is not None and not isinstance(text, str):
            raise LlamanpError("the system prompt must be text")
        rest = self.messages[1:] if self.system is not None else self.messages
        self.messages = ([{"role": "system", "content": text}] if text else []) + rest

    def reset(self) -> None:
        """Start a new conversation with the same system prompt."""
        system = self.system
        self.messages = []
        self.set_system(system)

    def load(self, messages) -> None:
        """Replace the conversation (message dicts, as llamanp.chat takes them)."""
        checked = check_messages(messages, self.tokenizer)
        # rendering it with one more user message shows whether the layout accepts it
        self.template.render(list(messages) + [{"role": "user", "content": "?"}])
        self.messages = [{"role": m.role, "content": m.content,
                          **({"tokens": list(m.tokens)} if m.tokens is not None else {})}
                         for m in checked]

    # -- answering -------------------------------------------------------------------
    def respond(self, text: str, sampler: Callable, on_token: Optional[Callable] = None,
                max_new_tokens: Optional[int] = None) -> TurnStats:
        """Add the user message `text`, generate the answer, and return its stats.

        `sampler(logits, history) -> id` picks each token, `history` being the
        ids in the context so far (the conversation and the answer until then,
        for repetition penalties); `on_token(id)` sees each token as it is
        generated. The answer ends at the template's end of turn (or
        EOS), after `max_new_tokens`, when the context is full (see the
        context policy), or on KeyboardInterrupt (Ctrl-C), which keeps what was
        generated so far; an answer interrupted before its first token is
        dropped together with its message. A message that does not fit raises
        LlamanpError and leaves the conversation as it was.
        """
        if not isinstance(text, str):
            raise LlamanpError("a message must be text")
        if max_new_tokens is not None and not (isinstance(max_new_tokens, int)
                                               and max_new_tokens > 0):
            raise LlamanpError(f"the answer length limit must be a positive number of "
                               f"tokens, got {max_new_tokens!r}")
        self._repair()            # in case an interrupt cut short the last bookkeeping
        st = TurnStats(turn=len(self.turns) + 1, context_size=self.context_size)
        convo = self.messages + [{"role": "user", "content": text}]
        answer: list[int] = []
        stops, ends = self.template.stop_ids, self.template.end_of_turn_ids
        try:
            convo, prompt = self._fit(convo, answer, st)
            if len(prompt) >= self.context_size:
                raise LlamanpError(self._does_not_fit(len(prompt)))
            st.prompt_tokens = len(prompt)
            logits = self._advance_to(prompt, st, first=True)
            while True:
                token = int(sampler(logits, self.session.tokens))
                if token in stops:
                    st.stop_reason = "end_of_turn" if token in ends else "eos"
                    break
                answer.append(token)
                st.generated_tokens += 1
                if on_token is not None:
                    on_token(token)
                if max_new_tokens is not None and len(answer) >= max_new_tokens:
                    st.stop_reason = "length"
                    break
                if len(self.session.tokens) >= self.context_size:  # no room to feed it
                    kept, ids = self._fit(convo, answer, st)
                    if len(ids) >= self.context_size:
                        st.stop_reason = "context"
                        break
                    convo = kept
                    logits = self._advance_to(ids, st)
                    continue
                t0 = time.perf_counter()
                logits = self.session.feed([token])
                st.decode_seconds += time.perf_counter() - t0
                st.decode_steps += 1
        except KeyboardInterrupt:
            st.stop_reason = "interrupted"
            self._repair()
        if answer or st.stop_reason != "interrupted":
            self.messages = convo + [{"role": "assistant",
                                      "content": self.tokenizer.decode(answer),
                                      "tokens": answer}]
        st.context_tokens = len(self.session.tokens)
        self.turns.append(st)
        return st

    def _fit(self, convo: list[dict], answer: list[int], st: TurnStats):
        """The conversation that will be fed, and its ids (plus `answer`, the
        answer so far). Under drop-oldest, old exchanges are dropped when it
        does not fit; the caller checks whether the result fits."""
        ids = self.template.render(convo) + answer
        if len(ids) < self.context_size or self.context_policy != "drop-oldest":
            return convo, ids
        first = 1 if convo[0]["role"] == "system" else 0
        kept = list(convo)
        while len(kept) - first > 1:            # the last message is the one being answered
            del kept[first]                     # the oldest user message ...
            while len(kept) - first > 1 and kept[first]["role"] != "user":
                del kept[first]                 # ... and what answered it
            ids = self.template.render(kept) + answer
            if len(ids) <= self.context_size // 2:
                break
        if len(ids) < self.context_size:
            st.dropped_messages += len(convo) - len(kept)
            return kept, ids
        return convo, ids

    def _does_not_fit(self, n: int) -> str:
        has_history = any(m["role"] != "system" for m in self.messages)
        if self.context_policy == "stop" and has_history:
            return (f"the conversation would take {n} tokens but the context holds "
                    f"{self.context_size}; /reset to start a new one, or run with "
                    "--context-policy drop-oldest")
        return (f"this message does not fit in the context ({n} tokens of "
                f"{self.context_size}{', even without the older messages' if has_history else ''}"
                "); send a shorter one")

    def _advance_to(self, ids: list[int], st: TurnStats, first: bool = False):
        """Make the session hold exactly `ids`, computing only what the cache
        lacks; return the logits of the last id."""
        s = self.session
        keep = _common_prefix(s.tokens, ids)
        if keep == len(ids):
            keep -= 1             # the last position is run again for its logits
        del s.tokens[keep:]
        s.cache.truncate(keep)
        if first:
            st.reused_tokens = 0 if s.cache.recompute else keep
        computed_before, t0 = s.computed, time.perf_counter()
        logits = s.feed(ids[keep:])
        st.prefill_seconds += time.perf_counter() - t0
        st.computed_tokens += s.computed - computed_before
        return logits

    def _repair(self) -> None:
        """After an interrupt, keep only what both the token list and the cache hold."""
        s = self.session
        if s.cache.recompute:
            return                # no cache: the tokens alone are the state
        n = min(len(s.tokens), s.cache.length)
        del s.tokens[n:]
        s.cache.truncate(n)


# -- saved conversations -------------------------------------------------------------


def save_conversation(chat: Chat, path) -> int:
    """Write the conversation as JSON; returns the number of messages."""
    doc = {"format": FILE_FORMAT, "version": FILE_VERSION, "template": chat.template.name,
           "messages": chat.messages}
    try:
        Path(path).write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n",
                              encoding="utf-8")
    except OSError as e:
        raise LlamanpError(f"cannot write {path}: {e.strerror}") from None
    return len(chat.messages)


def read_conversation(path, tokenizer) -> list[dict]:
    """Messages from a file written by /save (or a JSON list of messages)."""
    def bad(why):
        return LlamanpError(f"cannot load {path}: {why}; the conversation is unchanged")

    try:
        doc = inputfile.load(path)     # bounded: size, nesting, digits; regular files only
    except inputfile.JsonFileError as e:
        raise bad(e.problem) from None
    if isinstance(doc, dict):
        if doc.get("format") != FILE_FORMAT:
            raise bad(f"not a saved conversation (no \"format\": \"{FILE_FORMAT}\")")
        if doc.get("version") != FILE_VERSION:
            raise bad(f"saved conversation version {doc.get('version')!r}, this llamanp "
                      f"reads version {FILE_VERSION}")
        messages = doc.get("messages")
    else:
        messages = doc
    try:
        checked = check_messages(messages)
    except LlamanpError as e:
        raise bad(str(e)) from None
    out = []
    for m in checked:
        message = {"role": m.role, "content": m.content}
        if m.tokens is not None and _decodes_to(tokenizer, m.tokens, m.content):
            message["tokens"] = list(m.tokens)
        out.append(message)
    return out


def _decodes_to(tokenizer, ids, text: str) -> bool:
    try:
        return tokenizer.decode(ids) == text
    except LlamanpError:        # ids outside this tokenizer's vocabulary
        return False


# -- the console ---------------------------------------------------------------------

HELP = """\
commands:
  /reset          start a new conversation (the system prompt stays)
  /system TEXT    set the system prompt (/system alone removes it)
  /save FILE      save the conversation as JSON
  /load FILE      continue a saved conversation
  /stats          per-turn statistics
  /quit           leave (Ctrl-D does too)
Ctrl-C stops an answer; start a message with // to send a leading /."""


class Console:
    """The read-answer loop around a Chat."""

    prompt = "> "

    def __init__(self, chat: Chat, sampler_factory: Callable, input, output,
                 stats_file=None, max_new_tokens: Optional[int] = None):
        self.chat = chat
        self.sampler_factory = sampler_factory
        self.sampler = sampler_factory()
        self.input, self.out = input, output
        self.stats_file = stats_file
        self.max_new_tokens = max_new_tokens
        self.status = 0         # the exit status: 1 once a message could not be answered
        isatty = getattr(input, "isatty", None)
        self.interactive = bool(isatty and isatty())
        # Notices go with the conversation on a terminal, apart from it in a pipe.
        self.notices = output if self.interactive else sys.stderr
        self.use_readline = (self.interactive and input is sys.stdin and output is sys.stdout)
        if self.use_readline:
            try:
                import readline  # noqa: F401  (input() gains line editing and history)
            except ImportError:
                pass

    def run(self) -> int:
        if self.interactive:
            c = self.chat
            self.note(f"llamanp chat | template {c.template.name} | context {c.context_size} "
                      f"tokens | kvcache {c.session.cache.strategy} | context policy "
                      f"{c.context_policy}\n/help lists the commands; Ctrl-C stops an answer, "
                      "Ctrl-D leaves.")
        line: Optional[str] = None
        while True:
            try:
                line = self.read()
                if line is None:
                    break
                if not self.handle(line):
                    break
            except KeyboardInterrupt:
                if not self.interactive:
                    raise                   # a script was interrupted: stop it
                self.out.write("\n")        # Ctrl-C at the prompt: a fresh prompt
                self.out.flush()
        if self.interactive and line is None:
            self.out.write("\n")            # leave the shell's prompt on a new line
            self.out.flush()
        return self.status

    def answer_one(self, text: str) -> int:
        """`--chat -i TEXT`: answer one message; the exit status."""
        self.turn(text)
        return self.status

    def read(self) -> Optional[str]:
        """The next line typed (without its newline), or None at the end of input."""
        if self.use_readline:
            try:
                return builtins.input(self.prompt)
            except EOFError:
                return None
        if self.interactive:
            self.out.write(self.prompt)
            self.out.flush()
        line = self.input.readline()
        return None if line == "" else line.rstrip("\r\n")

    def note(self, text: str) -> None:
        self.notices.write(text + "\n")
        self.notices.flush()

    def say(self, text: str) -> None:
        """Output that was asked for (/stats, /help): with the answers."""
        self.out.write(text + "\n")
        self.out.flush()

    # -- one line --------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """Act on one input line; False means leave."""
        if not line.strip():
            return True
        if line.startswith("/") and not line.startswith("//"):
            return self.command(line)
        answered = self.turn(line[1:] if line.startswith("//") else line)
        # a script cannot read the error and /reset: its run ends, and says it failed
        return answered or self.interactive

    def command(self, line: str) -> bool:
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        chat = self.chat
        if name in ("quit", "exit"):
            return False
        if name == "help":
            self.say(HELP)
        elif name == "reset":
            chat.reset()
            self.sampler = self.sampler_factory()
            self.note("[new conversation" + (", same system prompt]" if chat.system else "]"))
        elif name == "system":
            chat.set_system(arg or None)
            self.note("[system prompt set]" if arg else "[system prompt removed]")
        elif name in ("save", "load") and not arg:
            self.note(f"usage: /{name} FILE")
        elif name == "save":
            try:
                n = save_conversation(chat, arg)
                self.note(f"[saved {n} messages to {arg}]")
            except LlamanpError as e:
                self.note(f"error: {e}")
        elif name == "load":
            try:
                chat.load(read_conversation(arg, chat.tokenizer))
            except LlamanpError as e:
                self.note(f"error: {e}")
            else:
                self.sampler = self.sampler_factory()
                self.note(f"[loaded {len(chat.messages)} messages from {arg}]")
        elif name == "stats":
            self.say(self.stats_text())
        else:
            self.note(f"unknown command /{name}; /help lists the commands (start a message "
                      "with // to send a leading /)")
        return True

    def turn(self, text: str) -> bool:
        """Answer `text`; False (and exit status 1) if it could not be answered."""
        stream = self.chat.tokenizer.stream(at_start=True)
        out = self.out

        def show(token: int) -> None:
            piece = stream.push(token)
            if piece:
                out.write(piece)
                out.flush()

        try:
            st = self.chat.respond(text, self.sampler, show, self.max_new_tokens)
        except LlamanpError as e:
            self.note(f"error: {e}")
            self.status = 1
            return False
        if st.generated_tokens or st.stop_reason != "interrupted":
            out.write(stream.flush() + "\n")
            out.flush()
        if st.stop_reason == "interrupted":
            self.note("[interrupted]" if st.generated_tokens else
                      "[interrupted before the answer began; the message was dropped]")
        elif st.stop_reason == "context":
            self.note(f"[the context is full ({st.context_size} tokens): the answer was cut; "
                      "/reset to start a new conversation, or run with --context-policy "
                      "drop-oldest]")
        if st.dropped_messages:
            self.note(f"[dropped the {st.dropped_messages} oldest messages to make room]")
        if self.stats_file is not None:
            record = dict(st.to_dict(), template=self.chat.template.name,
                          kvcache=self.chat.session.cache.strategy)
            self.stats_file.write(json.dumps(record) + "\n")
            self.stats_file.flush()
        return True

    def stats_text(self) -> str:
        c = self.chat
        lines = [t.line() for t in c.turns] or ["no answers yet"]
        lines.append(f"context: {len(c.session.tokens)} of {c.context_size} tokens in use | "
                     f"template {c.template.name} | kvcache {c.session.cache.strategy} | "
                     f"context policy {c.context_policy}")
        return "\n".join(lines)


def run_chat(model, sampler_factory: Callable, system: Optional[str] = None,
             template: Optional[str] = None, kvcache: str = "inplace",
             max_seq_len: Optional[int] = None, stats_json=None, input=None, output=None,
             *, context_policy: str = DEFAULT_CONTEXT_POLICY,
             max_new_tokens: Optional[int] = None, message: Optional[str] = None) -> int:
    """Run the chat console until the input ends or /quit; returns the exit status
    (1 if a message could not be answered without a person there to /reset).

    With `message`, answer just that message and return.

    `sampler_factory()` makes the sampler (a llamanp.sampling.Sampler, or any
    callable (logits, history) -> id); it is called at the start and again at
    /reset and /load, so that a seeded sampler replays a conversation from its
    beginning. `input` and `output` default to sys.stdin and sys.stdout.
    Setup problems (an unknown template, an unwritable stats file) raise
    LlamanpError.
    """
    input = sys.stdin if input is None else input
    output = sys.stdout if output is None else output
    if max_new_tokens is not None and not (isinstance(max_new_tokens, int)
                                           and max_new_tokens > 0):
        raise LlamanpError(f"the answer length limit (-n) must be a positive number of "
                           f"tokens in a chat, got {max_new_tokens!r}")
    chat = Chat(model, template, kvcache, max_seq_len, context_policy, system)
    stats_file = None
    if stats_json is not None:
        stats_file = fileio.open_output(stats_json, "statistics file")
    try:
        console = Console(chat, sampler_factory, input, output, stats_file, max_new_tokens)
        return console.run() if message is None else console.answer_one(message)
    finally:
        if stats_file is not None:
            stats_file.close()


# -- command line --------------------------------------------------------------------


def add_chat_arguments(parser) -> None:
    """Add --chat, --system, --chat-template and --context-policy to a parser."""
    g = parser.add_argument_group("chat")
    g.add_argument("--chat", action="store_true",
                   help="talk with the model in an interactive console (/help lists its "
                        "commands); with piped input, one message per line")
    g.add_argument("--system", metavar="TEXT", help="the system prompt")
    g.add_argument("--chat-template", metavar="NAME",
                   help=f"chat layout: {', '.join(TEMPLATE_NAMES)} (default: the one the "
                        "model file names, else guessed from its tokenizer)")
    g.add_argument("--context-policy", choices=CONTEXT_POLICIES, default=DEFAULT_CONTEXT_POLICY,
                   help="when the conversation outgrows the context: 'stop' (the default) "
                        "says so and stops; 'drop-oldest' forgets the oldest exchanges, "
                        "never the system prompt, and goes on")


def run_chat_from_args(model, args, sampler_factory: Callable, kvcache: str = "inplace",
                       max_new_tokens: Optional[int] = None,
                       message: Optional[str] = None) -> int:
    """run_chat with the options add_chat_arguments added (and args.seqlength,
    args.stats_json when the parser has them); `message` answers one message."""
    return run_chat(model, sampler_factory, system=args.system, template=args.chat_template,
                    kvcache=kvcache, max_seq_len=getattr(args, "seqlength", None),
                    stats_json=getattr(args, "stats_json", None),
                    context_policy=args.context_policy, max_new_tokens=max_new_tokens,
                    message=message)
