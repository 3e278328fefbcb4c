"""Split inference: generation across the cut with a KV cache on each side.

The data party embeds the prompt, runs its head blocks with its own cache and sends the prefix's
hidden states once (``gen_start``); afterwards one hidden vector per sequence crosses per decoding
step (``gen_step``). The model party keeps a cache of its blocks per session. In HT it holds the
LM head and returns the chosen token (or, on request, the last position's logits); in HBT the
hidden states come back and the data party's tail and LM head choose, so outputs never leave it.

Messages (data party → model party, reply):

``gen_start`` {hidden [B,T,H], attention_mask [B,T]} meta {session, max_length, decoding...}
    → {token [B]} | {logits [B,V]} (HT) | {hidden [B,T,H]} (HBT)
``gen_step``  {hidden [B,1,H]} meta {session} → same kinds, one position
``gen_end``   meta {session} (one-way)
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from splitfed.models.partition import Segment
from splitfed.protocol import GEN_KINDS, ErrorCode, ProtocolError, check_mask
from splitfed.split.decoding import DecodingConfig, TokenChooser
from splitfed.split.front import DataFront, FrontContext
from splitfed.transport.channel import Channel, Message


class InferenceError(ProtocolError):
    """A generation request that cannot be served (unknown session: code ``unknown_session``; limits)."""


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as transformers' ``generate`` computes them."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def new_cache(segment: Segment) -> Any:
    """An empty transformers cache for the model a segment belongs to (only its blocks fill)."""
    from transformers import DynamicCache

    return DynamicCache(config=segment.config)  # type: ignore[arg-type]


@dataclass
class _HostSession:
    segment: Segment
    cache: Any
    mask: torch.Tensor
    last_position: torch.Tensor
    max_length: int
    chooser: TokenChooser | None
    return_logits: bool
    last_used: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return int(self.mask.shape[0] * self.max_length)


class InferenceHost:
    """The model party's side of generation: per-session caches with limits.

    Parameters
    ----------
    body : Segment
        The model party's segment (ends with the LM head in HT).
    max_sessions : int, default 64
    max_cached_tokens : int, default 2**20
        Bound on the sum over sessions of batch × max_length; the least recently used sessions
        are evicted to make room (their clients restart them by replaying their prefix).
    idle_timeout_s : float, default 600
        Sessions unused this long are evicted.
    select : Callable[[Message], Segment] | None
        Picks the segment serving a session (the model party enters ``body`` at the data party's
        ``head_layers``); ``body`` itself by default.
    """

    def __init__(
        self,
        body: Segment,
        max_sessions: int = 64,
        max_cached_tokens: int = 2**20,
        idle_timeout_s: float = 600.0,
        select: Callable[[Message], Segment] | None = None,
    ) -> None:
        self.body = body
        self.select = select or (lambda message: body)
        self.max_sessions = max_sessions
        self.max_cached_tokens = max_cached_tokens
        self.idle_timeout_s = idle_timeout_s
        self.sessions: OrderedDict[tuple[str, str], _HostSession] = OrderedDict()
        self.evictions = 0

    @property
    def cached_tokens(self) -> int:
        """Tokens reserved by open sessions."""
        return sum(s.tokens for s in self.sessions.values())

    def handle(self, message: Message) -> Message | None:
        """Serve one ``gen_*`` message."""
        key = (str(message.meta.get("client", "")), str(message.meta.get("session", "")))
        if not key[1]:
            raise InferenceError(f"{message.kind} needs a 'session' id in its metadata")
        if message.kind == "gen_end":
            self.sessions.pop(key, None)
            return None
        self._evict_idle()
        if message.kind == "gen_start":
            return self._start(key, message)
        if message.kind == "gen_step":
            return self._step(key, message)
        raise InferenceError(f"unknown generation message kind {message.kind!r}; expected one of {GEN_KINDS}")

    def _evict_idle(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self.sessions.items() if now - s.last_used > self.idle_timeout_s]:
            del self.sessions[key]
            self.evictions += 1

    def _make_room(self, key: tuple[str, str], tokens: int) -> None:
        if tokens > self.max_cached_tokens:
            raise InferenceError(
                f"session needs {tokens} cached tokens (batch x max_length); the model party allows at most "
                f"{self.max_cached_tokens}: use a smaller batch or max_new_tokens",
                ErrorCode.LIMIT,
            )
        self.sessions.pop(key, None)
        while self.sessions and (
            self.cached_tokens + tokens > self.max_cached_tokens or len(self.sessions) >= self.max_sessions
        ):
            self.sessions.popitem(last=False)  # least recently used
            self.evictions += 1

    def _start(self, key: tuple[str, str], message: Message) -> Message:
        hidden, mask = message.tensors.get("hidden"), message.tensors.get("attention_mask")
        if hidden is None or mask is None or hidden.dim() != 3:
            got = {k: (str(v.dtype), tuple(v.shape)) for k, v in message.tensors.items()}
            raise InferenceError(
                f"gen_start carries hidden [batch, seq, hidden] and attention_mask [batch, seq]; got {got}"
            )
        check_mask(mask, int(hidden.shape[0]), int(hidden.shape[1]))
        max_length = int(message.meta.get("max_length", 0) or 0)
        if max_length < hidden.shape[1]:
            raise InferenceError(
                f"max_length {max_length} is shorter than the prefix ({hidden.shape[1]} positions)"
            )
        self._make_room(key, int(hidden.shape[0]) * max_length)
        chooser = None
        return_logits = bool(message.meta.get("return_logits", False))
        segment = self.select(message)
        if segment.has_finish and not return_logits:
            chooser = TokenChooser(DecodingConfig.from_meta(message.meta))
        mask = mask.long()
        positions = positions_from_mask(mask)
        session = _HostSession(
            segment, new_cache(segment), mask, positions[:, -1], max_length, chooser, return_logits
        )
        self.sessions[key] = session
        return self._run(session, hidden, positions)

    def _step(self, key: tuple[str, str], message: Message) -> Message:
        session = self.sessions.get(key)
        if session is None:
            raise InferenceError(
                f"unknown generation session {key[1]!r}: it ended, expired or was evicted; restart it with "
                "gen_start (SplitGenerator does this by replaying its prefix)",
                ErrorCode.UNKNOWN_SESSION,
            )
        self.sessions.move_to_end(key)
        hidden = message.tensors.get("hidden")
        batch = session.mask.shape[0]
        if hidden is None or hidden.dim() != 3 or tuple(hidden.shape[:2]) != (batch, 1):
            got = None if hidden is None else tuple(hidden.shape)
            raise InferenceError(f"gen_step carries hidden [{batch}, 1, hidden] for this session; got {got}")
        if session.mask.shape[1] + 1 > session.max_length:
            raise InferenceError(
                f"session {key[1]!r} reached its maximum length: prefix + generated = {session.mask.shape[1]} + 1 "
                f"exceeds max_length {session.max_length}",
                ErrorCode.LIMIT,
            )
        session.mask = torch.cat([session.mask, session.mask.new_ones(batch, 1)], dim=1)
        positions = (session.last_position + 1).unsqueeze(1)
        return self._run(session, hidden, positions)

    @torch.no_grad()
    def _run(self, session: _HostSession, hidden: torch.Tensor, positions: torch.Tensor) -> Message:
        session.segment.eval()
        out = session.segment(
            hidden=hidden, attention_mask=session.mask, position_ids=positions, past_key_values=session.cache
        )
        session.last_position = positions[:, -1]
        session.last_used = time.monotonic()
        if not session.segment.has_finish:
            return Message("gen_result", {"hidden": out})
        last = out[:, -1].float()
        if session.chooser is None:
            return Message("gen_result", {"logits": last})
        return Message("gen_result", {"token": session.chooser.choose(last)})


@dataclass
class StreamEvent:
    """One generated token of one sequence (``text`` is its decoded piece)."""

    index: int
    token: int
    text: str
    finished: bool


#: ``(session, prompt_ids, attention_mask, generated)``: what a generator tells its ground-truth observer.
GenerationObserver = Callable[..., None]  # (session, prompt_ids, attention_mask, generated, prompts=)


class SplitGenerator:
    """The data party's generation session: created, stepped, closed (also a context manager).

    Parameters
    ----------
    head : Segment
        Embeddings + first blocks.
    channel : Channel
        To the model party.
    tokenizer
        The model's tokenizer (left padding is used for batches).
    tail : Segment | None
        HBT: the data party's last blocks + LM head; tokens are then chosen here.
    decoding : DecodingConfig
    return_logits : bool, default False
        HT only: ask the model party for last-position logits and choose tokens here (more bytes;
        lets the repetition penalty see the prompt).
    chat : bool, default False
        Wrap each prompt in the tokenizer's chat template (as a user turn) when it has one.
    ground_truth : GenerationObserver | None, default None
        Called as ``ground_truth(session, prompt_ids, attention_mask, generated, prompts=...)`` when
        a generation finishes (``prompts``: the texts as given, before text defenses): the data
        party's private record of each session, for scoring attacks
        (e.g. :meth:`~splitfed.privacy.recording.GroundTruthWriter.generation`). Nothing it sees crosses.

    Examples
    --------
    >>> with SplitGenerator(head, channel, tokenizer) as gen:          # doctest: +SKIP
    ...     print(gen.generate(["Once upon a time"])[0])
    """

    def __init__(
        self,
        head: Segment,
        channel: Channel,
        tokenizer: Any,
        tail: Segment | None = None,
        decoding: DecodingConfig | None = None,
        return_logits: bool = False,
        chat: bool = False,
        ground_truth: GenerationObserver | None = None,
        front: DataFront | None = None,
    ) -> None:
        self.head, self.channel, self.tokenizer, self.tail = head, channel, tokenizer, tail
        #: The data party's defenses: prompts, embeddings and every position's activations pass them.
        self.front = front if front is not None else DataFront()
        self.front.check_tail(tail is not None)  # a defense on the tail's input needs the tail (not HT)
        self.ground_truth = ground_truth
        self._prompts: list[str] = []
        self.decoding = decoding or DecodingConfig()
        self.return_logits = return_logits and tail is None
        self.chat = chat
        self.session_id = ""
        self.restarts = 0
        self._open = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> SplitGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the current session on both sides."""
        if self._open:
            self._open = False
            self.channel.send(Message("gen_end", {}, {"session": self.session_id}))

    # ------------------------------------------------------------------ helpers
    def _encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if not prompts:
            raise ValueError("no prompts given")
        self._prompts = list(prompts)  # as given, before text defenses (for the ground truth)
        texts = self.front.text(list(prompts), FrontContext("generate"))
        if self.chat and getattr(self.tokenizer, "chat_template", None):
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in texts
            ]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        return enc["input_ids"], enc["attention_mask"]

    def _stop_ids(self) -> set[int]:
        """EOS ids exactly as ``generate`` resolves them: ``model.generation_config.eos_token_id`` only.

        transformers 5 takes an id, a list or a tensor from the generation config and never falls back
        to the tokenizer's EOS or ``model.config``: with ``eos_token_id=None`` it stops at no token.
        """
        eos = getattr(getattr(self.head.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            return set()
        return {int(i) for i in torch.as_tensor(eos).reshape(-1).tolist()}

    def _through_front(self, step: int, **inputs: Any) -> torch.Tensor:
        """The head's output for new positions, through the data party's defenses (prefill: step 0)."""
        context = FrontContext(
            "generate",
            batch_id=step,
            attention_mask=inputs["attention_mask"],
            input_ids=inputs.get("input_ids"),
        )
        hidden = self.front.run_head(self.head, context, **inputs)
        return self.front.activations(hidden, context)[0]

    def _choose_here(self, reply: Message, positions: torch.Tensor) -> torch.Tensor:
        if "token" in reply.tensors:
            return reply.tensors["token"].long()
        context = FrontContext("generate", attention_mask=self._mask)
        if "logits" in reply.tensors:
            logits, _ = self.front.received("logits", reply.tensors["logits"], context)
        else:
            assert self.tail is not None
            hidden, _ = self.front.received("hidden", reply.tensors["hidden"], context)
            with torch.no_grad():
                self.tail.eval()
                out = self.tail(
                    hidden=hidden,
                    attention_mask=self._mask,
                    position_ids=positions,
                    past_key_values=self._tail_cache,
                )
            logits = out[:, -1]
        assert self._chooser is not None
        return self._chooser.choose(logits.float())

    def _request(self, kind: str, hidden: torch.Tensor, extra: dict[str, Any]) -> Message:
        meta = {"session": self.session_id} | extra
        tensors = {"hidden": hidden} | ({"attention_mask": self._mask} if kind == "gen_start" else {})
        return self.channel.request(Message(kind, tensors, meta))

    def _start_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "max_length": self._max_length,
            "return_logits": self.return_logits,
            "head_layers": self.head.end,
        }
        if self.tail is None and not self.return_logits:
            meta |= self.decoding.to_meta()
        return meta

    def _step_remote(self, hidden: torch.Tensor) -> Message:
        try:
            return self._request("gen_step", hidden, {})
        except ProtocolError as err:  # in process the host's own error, over gRPC the server's refusal
            if err.code != ErrorCode.UNKNOWN_SESSION:
                raise
            # The model party lost our session: replay everything we sent (Petals does the same).
            self.restarts += 1
            replay = torch.cat(self._sent, dim=1)
            reply = self._request("gen_start", replay, self._start_meta())
            if "hidden" in reply.tensors:  # HBT: only the newest position goes through our tail
                reply = Message(reply.kind, {"hidden": reply.tensors["hidden"][:, -1:]}, reply.meta)
            return reply

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def stream(self, prompts: Sequence[str]) -> Iterator[StreamEvent]:
        """Generate for ``prompts``, yielding each new token as it is chosen."""
        self.close()
        ids, mask = self._encode(prompts)
        batch, prefix = ids.shape
        self._mask = mask
        self._max_length = prefix + self.decoding.max_new_tokens
        self._tail_cache = new_cache(self.tail) if self.tail is not None else None
        self._chooser = None
        if self.tail is not None or self.return_logits:
            self._chooser = TokenChooser(self.decoding)
            self._chooser.observe(ids)
        self.session_id = uuid.uuid4().hex[:16]
        head_cache = new_cache(self.head)
        positions = positions_from_mask(mask)
        self.head.eval()
        self.front.train(False)
        hidden = self._through_front(
            0, input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=head_cache
        )
        self._sent = [hidden]
        reply = self._request("gen_start", hidden, self._start_meta())
        self._open = True
        token = self._choose_here(reply, positions)
        stop_ids = set() if self.decoding.ignore_eos else self._stop_ids()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        finished = torch.zeros(batch, dtype=torch.bool)
        generated: list[list[int]] = [[] for _ in range(batch)]
        last = positions[:, -1]
        for step in range(self.decoding.max_new_tokens):
            token = torch.where(finished, torch.full_like(token, pad), token)
            for row in range(batch):
                if finished[row]:
                    continue
                tok = int(token[row])
                generated[row].append(tok)
                done = tok in stop_ids or self._hit_stop(generated[row])
                text = self.tokenizer.decode([tok], skip_special_tokens=True)
                if done:
                    finished[row] = True
                yield StreamEvent(row, tok, text, bool(done))
            if bool(finished.all()) or step == self.decoding.max_new_tokens - 1:
                break
            self._mask = torch.cat([self._mask, self._mask.new_ones(batch, 1)], dim=1)
            last = last + 1
            step_positions = last.unsqueeze(1)
            hidden = self._through_front(
                step + 1,
                input_ids=token.unsqueeze(1),
                attention_mask=self._mask,
                position_ids=step_positions,
                past_key_values=head_cache,
            )
            self._sent.append(hidden)
            reply = self._step_remote(hidden)
            token = self._choose_here(reply, step_positions)
        self.generated = generated
        if self.ground_truth is not None:
            self.ground_truth(self.session_id, ids, mask, generated, prompts=self._prompts)
        self.close()

    def _hit_stop(self, tokens: list[int]) -> bool:
        if not self.decoding.stop:
            return False
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in self.decoding.stop)

    def generate(self, prompts: Sequence[str]) -> list[str]:
        """The completions of ``prompts`` (without the prompt; cut at a stop string)."""
        for _ in self.stream(prompts):
            pass
        texts = []
        for tokens in self.generated:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for stop in self.decoding.stop:
                if stop in text:
                    text = text[: text.index(stop)]
            texts.append(text)
        return texts

    def generate_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """The generated token ids of each prompt (EOS included when produced)."""
        for _ in self.stream(prompts):
            pass
        return self.generated
