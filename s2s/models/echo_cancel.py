"""Acoustic echo cancellation: the reply the speaker plays is removed from the microphone, so
the user can talk over the assistant at a normal level. The client runs it on its microphone
(``s2s/client/echo_cancel.py``); the server runs it for clients that do not
(``s2s/pipeline/reply_echo.py``). Both hand it the same thing: each 10 ms block of the
microphone with the 10 ms of reply audio that was playing at the same moment.

WebRTC's audio processing (AEC3, through the ``livekit`` package's prebuilt wheels) adapts a
filter from the played audio (the far end) to the echo it finds in the microphone, and
suppresses what is left of it; it also finds the delay between the two by itself.

AEC3's linear filter spans only the first ~50 ms of the echo path (13 blocks of 4 ms in its
default configuration); a room's reverberation after that is left to its suppressor, which,
while the user talks over a loud echo, turns their voice down with it (on a simulated room with
200 ms of reverberation and the echo 10 dB under the reply, a user at -30 dBFS was heard up to
a second late, or not at all). So speexdsp's linear canceller (``pyaec``), whose filter spans
the whole 400 ms, runs beside it, followed by another AEC3 that has little echo left to
suppress. Speex is thrown off by double talk, though, and what it then leaves can sound like
speech; so the plain AEC3's output is sent while the user is silent, and the others only while
the user speaks over a reply (``VoiceSwitch``): speex then AEC3 while the voice is tentative
(a cough must not become speech), speex's output alone once the voice has lasted
VOICE_CONFIRM_S (the second AEC3 still mutes parts of a voice as loud as the echo), until
NEAR_END_HOLD_S after the last block that held it.

Both AEC3s can mute a quiet voice over a loud echo for 400 ms and more, while speex alone keeps
it whole; and all three leave echo behind after a burst of double talk. So a model of the echo's
power that looks at nothing but the microphone and the reply (``s2s/models/near_end.py``) says
in which blocks the microphone stands over the echo: where it does and speex removed much less
of the block than it removes of the echo alone (``speex_holds_voice``), speex's output is sent
at once (SPEEX_VOICE_HOLD_S). Right after a loud burst (a cough), the blocks in which it finds
nothing over the echo are the cancellers' leftovers: they do not carry the voice on, and while
it is tentative they go out from the plain AEC3; in the first seconds of reply audio, while the
cancellers are young and leak most, they are muted, and in the first second, before the model
itself knows the room, so are those 20 dB under the burst.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from s2s.models.errors import require
from s2s.models.near_end import EchoPowerModel
from s2s.pipeline.messages import Samples

BLOCK_MS = 10
"""The block WebRTC's audio processing works in."""
APM_RATES_HZ = frozenset({8_000, 16_000, 32_000, 48_000})
INT16_SCALE = 32767.0
LINEAR_FILTER_MS = 400
"""The long linear filter's span: a delay up to 150 ms plus 200 ms of reverberation."""
NEAR_END_POWER = 10 ** (-50.0 / 10)
"""A block of the plain AEC3's output louder than this (-50 dBFS) holds the user's voice."""
LEAK_POWER = 10 ** (-75.0 / 10)
CHAIN_VOICE_POWER = 10 ** (-40.0 / 10)
"""A block also holds the user's voice when the plain AEC3 lets a trace of it through (over
LEAK_POWER, -75 dBFS: its echo alone stays near -90) while the speex-then-AEC3 chain passes it
(over CHAIN_VOICE_POWER, -40 dBFS): over a loud echo the plain AEC3 may hold a voice under
-50 dBFS for its first 250 ms, while the chain passes it from about 70 ms. Neither alone: the
chain's leftovers after double talk reach -40 dBFS with the plain AEC3 silent."""
CONVERGE_S = 1.0
"""Reply audio both chains must have heard before the switch is armed: until AEC3 has learned
the room, its own output leaks echo that would look like the user's voice."""
REPLY_RECENT_S = 0.5
"""The switch is armed only while a reply plays (reply audio this recent, covering its echo's
delay and the pauses between its words): a voice over silence needs no chain, and the next
reply then starts on the plain AEC3."""
VOICE_CONFIRM_S = 0.2
"""A voice is taken as the user talking once blocks holding it have gone on this long (at
most TENTATIVE_HOLD_S apart); until then the chain is sent only for TENTATIVE_HOLD_S after
each such block. A 150 ms cough stays tentative, so the chain's leftovers of the echo cannot
stretch it into 300 ms of speech."""
TENTATIVE_HOLD_S = 0.1
NEAR_END_HOLD_S = 0.5
"""Once the user is talking, speex's output is sent until this long after the last block
that held their voice: over the pauses between words while the reply still plays (it stops
about 350 ms after the voice began), and no longer, as speex's leftovers of the echo can sound
like speech."""
SPEEX_VOICE_BANDS = 3
"""Bands over the expected echo (``EchoPowerModel``) for speex's output to be taken as a
voice; the echo alone reaches 3 in under 1% of its blocks, the blocks after a cough in none."""
SPEEX_PASSES = 10 ** (-6.0 / 10)
"""... when speex's output keeps this much of the microphone's power (within 6 dB: it removed
little, so the microphone was not mostly echo) ..."""
SPEEX_UNDER_ECHO = 10 ** (4.0 / 10)
"""... and removed at least this much (4 dB) less than it removes of the echo alone: in its
first second or two of reply audio speex removes 6-8 dB of the echo, and half the echo's
blocks would pass the 6 dB test (the echo sent as a voice, 30 dB over what AEC3 leaves) ..."""
SPEEX_VOICE_POWER = 10 ** (-45.0 / 10)
"""... is over -45 dBFS ..."""
SPEEX_LEARNED = 10 ** (6.0 / 10)
"""... and speex has removed at least 6 dB of the echo in the blocks that held nothing else
(measured with a smoothing of SPEEX_SMOOTHING per block): an unconverged speex passes the echo
whole. (Waiting for 10 dB instead heard a quiet question in a session's first reply 550 ms
later.)"""
SPEEX_SMOOTHING = 0.02
SPEEX_VOICE_HOLD_S = 0.1
"""After a block that speex's output was taken as a voice for, speex's output is sent for
this long (while the switch sends anything but the plain AEC3)."""
BURST_BANDS = 6
"""A block with this many bands over the echo is a loud burst of the user's (a cough, a word)."""
YOUNG_S = 5.0
"""Reply audio before which the cancellers are young: all the coughs heard through them
offline fell in a session's first reply."""
AFTER_BURST_S = 0.3
QUIET_BANDS = 1
"""A block within AFTER_BURST_S of a burst with at most this many bands over the echo is the
cancellers' leftover of the echo, not the voice going on: disturbed by the burst, they leak
the echo after it for 100-200 ms (speex's leftovers at -45 to -55 dBFS, which Silero hears as
speech), and the VAD would hear the cough go on past 300 ms. Such a block does not carry a
voice on, and while the voice is tentative it is sent from the plain AEC3; while young, it is
muted (MUTE_GAIN) as well."""
UNDER_BURST = 10 ** (-20.0 / 10)
"""... and, before the switch is armed (CONVERGE_S), so is one whose output is this far (20 dB)
under the burst's loudest block: in the first second of reply audio the echo model, too, has
heard little of the room and finds the leak over the echo it expects, while the leak stays
25 dB and more under the cough. Later, a quiet voice over a loud echo can be that far under
its own loudest syllable."""
MUTE_GAIN = 10 ** (-30.0 / 20)


@dataclass(frozen=True, slots=True)
class EchoCancelOptions:
    noise_suppression: bool = False
    """WebRTC's noise suppressor after the echo canceller (steady fans and hum). Off by
    default: over a simulated room it delayed barge-in and removed no echo."""
    stream_delay_ms: int = 0
    """The sound card's output plus input latency, when known: a hint for the delay search."""
    keep_voice: bool = True
    """While the user talks over the reply, send what keeps their voice whole: speexdsp's
    long linear filter (followed by AEC3 while the voice is tentative; needs ``pyaec``).
    False: AEC3 alone."""
    watch_near_end: bool = True
    """Judge from the microphone and the reply alone (``EchoPowerModel``) when the user's
    voice is there: speex's output is sent for a quiet voice both AEC3s mute, and echo leaking
    after a cough in the first reply is muted. Measured for the client's microphone; the
    server's canceller leaves it off until measured there."""


class CancellerChain:
    """The cancellers over one microphone, a 10 ms block at a time (``block_samples``): not
    thread-safe, the caller pairs each microphone block with its reply block. ``start`` loads
    the libraries."""

    def __init__(self, rate_hz: int, options: EchoCancelOptions | None = None) -> None:
        if rate_hz not in APM_RATES_HZ:
            raise ValueError(
                f"echo cancellation works at {', '.join(map(str, sorted(APM_RATES_HZ)))} Hz, "
                f"not {rate_hz} Hz"
            )
        self.rate_hz = rate_hz
        self.options = options if options is not None else EchoCancelOptions()
        self.block_samples = rate_hz * BLOCK_MS // 1000
        self._apm: Any = None
        self._frame_type: Any = None
        self._linear: Any = None  # speexdsp's canceller, then ``_chained_apm``
        self._chained_apm: Any = None
        self._switch = VoiceSwitch()
        self._echo_power: EchoPowerModel | None = None
        self._speex_removed = _EchoRemoved()
        self.blocks = 0
        self.reply_blocks = 0
        """Blocks with reply audio in them: how much of the room the cancellers have heard."""
        self.voice_kept_blocks = 0
        """Blocks sent from speex's output, through AEC3 or not (for tests and the bench)."""

    def start(self, purpose: str = "Echo cancellation") -> None:
        """Load the libraries; ``purpose`` begins the error when one is missing."""
        rtc = require("livekit.rtc", "livekit", purpose)
        self._frame_type = rtc.AudioFrame
        self._apm = self._new_apm(rtc)
        if self.options.keep_voice:
            pyaec = require("pyaec", "pyaec", "Keeping the voice whole over the reply")
            filter_length = self.rate_hz * LINEAR_FILTER_MS // 1000
            self._linear = pyaec.Aec(self.block_samples, filter_length, self.rate_hz, False)
            self._chained_apm = self._new_apm(rtc)
        if self.options.watch_near_end:
            self._echo_power = EchoPowerModel(self.rate_hz, self.block_samples)

    def _new_apm(self, rtc: Any) -> Any:
        apm = rtc.AudioProcessingModule(
            echo_cancellation=True,
            noise_suppression=self.options.noise_suppression,
            high_pass_filter=True,
            auto_gain_control=False,
        )
        if self.options.stream_delay_ms:
            apm.set_stream_delay_ms(self.options.stream_delay_ms)
        return apm

    def process(self, near: Samples, far: Samples) -> Samples:
        """One block of the microphone without the echo of ``far``, the reply audio that was
        playing as it was captured (zeros when none)."""
        assert self._apm is not None, "start() first"
        self.blocks += 1
        playing = bool(np.any(far))
        self.reply_blocks += playing
        plain = self._through_apm(self._apm, near, far)
        plain_power = _power(plain)
        bands = None
        if self._echo_power is not None:
            bands = self._echo_power.step(near, far, echo_only=plain_power < LEAK_POWER)
        if self._linear is None:
            choice = self._switch.step(
                playing, voiced=False, bands=bands, powers={Sent.PLAIN: plain_power}
            )
            return plain * MUTE_GAIN if choice.muted else plain
        linear = self._linear.cancel_echo(_pcm(near).tolist(), _pcm(far).tolist())
        linear_out = np.asarray(linear, dtype=np.float32) / INT16_SCALE
        kept = self._through_apm(self._chained_apm, linear_out, far)
        near_power, linear_power = _power(near), _power(linear_out)
        if playing and bands is not None and bands <= QUIET_BANDS:
            self._speex_removed.add(near_power, linear_power)
        kept_power = _power(kept)
        choice = self._switch.step(
            playing,
            voiced=holds_voice(plain_power, kept_power),
            bands=bands,
            speex_voice=bands is not None
            and speex_holds_voice(
                bands, near_power, linear_power, echo_removed=self._speex_removed.ratio()
            ),
            powers={Sent.PLAIN: plain_power, Sent.CHAIN: kept_power, Sent.LINEAR: linear_power},
        )
        if choice.sent is Sent.PLAIN:
            sent = plain
        else:
            self.voice_kept_blocks += 1
            sent = kept if choice.sent is Sent.CHAIN else linear_out
        return sent * MUTE_GAIN if choice.muted else sent

    def _through_apm(self, apm: Any, near: Samples, far: Samples) -> Samples:
        apm.process_reverse_stream(self._frame(far))
        frame = self._frame(near)
        apm.process_stream(frame)  # in place
        data = np.frombuffer(frame.data, dtype=np.int16)
        return (data.astype(np.float32) / INT16_SCALE).astype(np.float32)

    def _frame(self, samples: Samples) -> Any:
        pcm = _pcm(samples)
        return self._frame_type(pcm.tobytes(), self.rate_hz, 1, len(pcm))


def _power(samples: Samples) -> float:
    return float(np.mean(np.square(samples, dtype=np.float64)))


class _EchoRemoved:
    """How much of the microphone's power a canceller removes, smoothed over the blocks it is
    given (those holding only echo)."""

    def __init__(self) -> None:
        self._before = 1e-9
        self._after = 1e-9

    def add(self, before: float, after: float) -> None:
        self._before += SPEEX_SMOOTHING * (before - self._before)
        self._after += SPEEX_SMOOTHING * (after - self._after)

    def ratio(self) -> float:
        return self._before / self._after


def holds_voice(plain_power: float, chain_power: float) -> bool:
    """Whether a block holds the user's voice, from the power of the plain AEC3's output and
    of the speex-then-AEC3 chain's."""
    return plain_power > NEAR_END_POWER or (
        plain_power > LEAK_POWER and chain_power > CHAIN_VOICE_POWER
    )


def speex_holds_voice(
    bands: int, near_power: float, linear_power: float, echo_removed: float
) -> bool:
    """Whether speex's output holds the user's voice: the microphone stands over the echo in
    ``bands`` bands (``EchoPowerModel``) and speex removed much less of this block than it
    removes of the echo alone (``echo_removed``, a power ratio)."""
    passes = max(SPEEX_PASSES, SPEEX_UNDER_ECHO / echo_removed)
    return (
        bands >= SPEEX_VOICE_BANDS
        and linear_power > passes * near_power
        and linear_power > SPEEX_VOICE_POWER
        and echo_removed > SPEEX_LEARNED
    )


class Sent(enum.Enum):
    """What a block of the microphone is sent as."""

    PLAIN = "AEC3"
    CHAIN = "speex, then AEC3"
    LINEAR = "speex alone"


@dataclass(frozen=True, slots=True)
class Choice:
    sent: Sent
    muted: bool = False
    """Sent MUTE_GAIN down: echo the cancellers leak after a burst."""


def _pcm(samples: Samples) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * INT16_SCALE).astype(np.int16)


class VoiceSwitch:
    """Pure: for each 10 ms block, which output is sent and whether it is muted, from whether
    reply audio was played in it, whether it holds the user's voice (``holds_voice``), the
    bands in which the microphone stands over the echo (``EchoPowerModel``; None until it has
    learned) and whether speex's output was found to hold a voice."""

    def __init__(self) -> None:
        def blocks(seconds: float) -> int:
            return round(seconds * 1000 / BLOCK_MS)

        self._converge = blocks(CONVERGE_S)
        self._recent = blocks(REPLY_RECENT_S)
        self._confirm = blocks(VOICE_CONFIRM_S)
        self._tentative = blocks(TENTATIVE_HOLD_S)
        self._hold = blocks(NEAR_END_HOLD_S)
        self._speex_hold = blocks(SPEEX_VOICE_HOLD_S)
        self._young = blocks(YOUNG_S)
        self._after_burst = blocks(AFTER_BURST_S)
        self._speex_voice_at = -(1 << 30)  # the last block speex's output held a voice in
        self._burst_at = -(1 << 30)  # the last block of a loud burst
        self._burst_power = 0.0  # of the loudest block sent in the last burst
        self._block = 0
        self._reply_blocks = 0  # blocks with reply audio so far
        self._since_reply = 1 << 30  # blocks since the last one with reply audio
        self._left = 0  # blocks the chain is still sent for
        self._voice_from = 0  # the block where the current voice began
        self._talking = False  # the current voice has lasted VOICE_CONFIRM_S

    def step(
        self,
        reply_playing: bool,
        voiced: bool,
        bands: int | None = None,
        speex_voice: bool = False,
        powers: Mapping[Sent, float] | None = None,
    ) -> Choice:
        """``powers``: of each output in this block, when known."""
        self._block += 1
        after_burst = self._block - self._burst_at < self._after_burst
        leftover = after_burst and bands is not None and bands <= QUIET_BANDS
        sent = self._sent_for(reply_playing, (voiced or speex_voice) and not leftover)
        if speex_voice:
            self._speex_voice_at = self._block
        if sent is not Sent.PLAIN and self._block - self._speex_voice_at < self._speex_hold:
            sent = Sent.LINEAR
        if leftover and not self._talking:
            sent = Sent.PLAIN
        power = powers.get(sent) if powers is not None else None
        if bands is not None and bands >= BURST_BANDS:
            if power is not None:
                self._burst_power = max(self._burst_power, power) if after_burst else power
            self._burst_at = self._block
            after_burst = True
        far_under = power is not None and power < UNDER_BURST * self._burst_power
        quiet = bands is not None and (
            bands <= QUIET_BANDS or (far_under and self._reply_blocks < self._converge)
        )
        muted = (
            quiet
            and after_burst
            and self._reply_blocks < self._young
            and self._since_reply <= self._recent
        )
        return Choice(sent, muted)

    def _sent_for(self, reply_playing: bool, voiced: bool) -> Sent:
        if reply_playing:
            self._reply_blocks += 1
            self._since_reply = 0
        else:
            self._since_reply += 1
        armed = self._reply_blocks >= self._converge and self._since_reply <= self._recent
        if armed and voiced:
            if self._left == 0:
                self._voice_from = self._block
            self._talking = self._block - self._voice_from >= self._confirm
            self._left = self._hold if self._talking else self._tentative  # after this one
            return self._sent()
        if self._left > 0:
            self._left -= 1
            return self._sent()
        return Sent.PLAIN

    def _sent(self) -> Sent:
        return Sent.LINEAR if self._talking else Sent.CHAIN
